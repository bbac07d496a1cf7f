"""Routes ``POST /v1/chat`` and ``POST /v1/chat/completions`` (streaming as server-sent events)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Body, Request, Response
from sse_starlette import EventSourceResponse

from gateway.chat.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    SimpleChatRequest,
    SimpleChatResponse,
    completion_id,
    openapi_examples,
)
from gateway.chat.serving import ChatService, TextEvent
from gateway.deps import ApiKey, State
from gateway.errors import BadRequestError, GatewayError, error_body

logger = logging.getLogger("gateway")
router = APIRouter(tags=["chat"])
# nginx's "client closed request": logged and counted for a client that left before its answer.
CLIENT_CLOSED_REQUEST = 499

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text}
    for code, text in {
        400: "Bad input (prompt over the context, n > 1, ...)",
        401: "Missing or invalid API key",
        404: "Unknown model",
        413: "Body too large",
        422: "Invalid request body",
        429: "Overloaded or rate limited (Retry-After)",
        503: "Triton unavailable",
    }.items()
}


def _check_openai_options(request: ChatCompletionRequest) -> None:
    if request.n != 1:
        raise BadRequestError("only n=1 is supported", param="n")
    if request.stream_options is not None and not request.stream:
        raise BadRequestError("stream_options is only allowed with stream=true", param="stream_options")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise BadRequestError(f"{name} is not supported (use repetition_penalty)", param=name)
    if request.logprobs:
        raise BadRequestError("logprobs are not supported", param="logprobs")


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(
    http_request: Request,
    state: State,
    caller: ApiKey,
    request: ChatCompletionRequest = Body(examples=[openapi_examples()]),
) -> Any:
    """OpenAI-compatible chat completions; ``stream=true`` answers with ``chat.completion.chunk`` events."""
    _check_openai_options(request)
    service = ChatService(state)
    service.check_size(*request.message_count_and_chars())
    request_id = completion_id()
    prepared = await service.prepare(
        request, request.template_messages(), request.requested_max_tokens(), caller, request_id
    )
    model = prepared.entry.name
    if not request.stream:
        result = await service.complete_or_cancel(prepared, http_request.is_disconnected)
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        text, finish, usage = result
        return ChatCompletionResponse(
            id=request_id,
            model=model,
            choices=[Choice(message=AssistantMessage(content=text), finish_reason=finish)],
            usage=usage,
        )
    events = service.generate(prepared)
    try:
        # Wait for the first event before answering, so admission and Triton errors keep their status code.
        first = await anext(events)
    except BaseException:
        await events.aclose()
        prepared.release()  # a generator closed before it started never ran its finally
        raise
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return EventSourceResponse(
        _sse(first, events, request_id, model, include_usage),
        sep="\n",  # OpenAI's framing, "data: {json}\n\n": many clients split events on "\n\n"
        ping=state.settings.sse_ping_s,
        headers={"X-Request-Id": request_id},
    )


def _chunk(request_id: str, created: int, model: str, include_usage: bool, choice: ChunkChoice | None) -> str:
    chunk = ChatCompletionChunk(
        id=request_id, created=created, model=model, choices=[choice] if choice is not None else []
    )
    data: dict[str, Any] = chunk.model_dump(mode="json", exclude={"usage"})
    for item in data["choices"]:
        item["delta"] = {k: v for k, v in item["delta"].items() if v is not None}
    if include_usage:
        data["usage"] = None
    return json.dumps(data, ensure_ascii=False)


_PLACEHOLDER = "\u0000content\u0000"


def _content_chunk(request_id: str, created: int, model: str, include_usage: bool) -> tuple[str, str]:
    """The JSON of a text-delta chunk, split where its text goes: one is sent per token, so build it once."""
    data = _chunk(request_id, created, model, include_usage, ChunkChoice(delta=Delta(content=_PLACEHOLDER)))
    before, _, after = data.partition(json.dumps(_PLACEHOLDER, ensure_ascii=False))
    return before, after


async def _sse(
    first: TextEvent, events: AsyncGenerator[TextEvent, None], request_id: str, model: str, include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    created = int(time.time())
    yield {
        "data": _chunk(
            request_id, created, model, include_usage, ChunkChoice(delta=Delta(role="assistant", content=""))
        )
    }
    before, after = _content_chunk(request_id, created, model, include_usage)
    try:
        event: TextEvent | None = first
        while event is not None:
            if event.text:
                yield {"data": before + json.dumps(event.text, ensure_ascii=False) + after}
            if event.finish_reason is not None:
                choice = ChunkChoice(delta=Delta(), finish_reason=event.finish_reason)
                yield {"data": _chunk(request_id, created, model, include_usage, choice)}
                if include_usage and event.usage is not None:
                    data = json.loads(_chunk(request_id, created, model, include_usage, None))
                    data["usage"] = event.usage.model_dump()
                    yield {"data": json.dumps(data)}
                break
            event = await anext(events, None)
    except GatewayError as err:
        # Headers are gone: report the error in the stream, as OpenAI-compatible servers do.
        yield {"data": json.dumps(error_body(err.status_code, err.message, err.error_type, err.param, err.code))}
    except Exception as err:  # noqa: BLE001 - a stream never ends silently: an error event, then [DONE]
        logger.exception("%s: the stream failed", request_id, exc_info=err)
        yield {"data": json.dumps(error_body(502, f"the generation failed: {type(err).__name__}", "upstream_error",
                                             None, "upstream_error"))}
    finally:
        await events.aclose()  # on disconnect too: cancels the Triton request
    yield {"data": "[DONE]"}


@router.post("/v1/chat", response_model=SimpleChatResponse, responses=_ERRORS)
async def chat(http_request: Request, state: State, caller: ApiKey, request: SimpleChatRequest) -> Any:
    """Simple chat: ``{"messages": [...]}`` or ``{"message": "..."}`` in, ``{"response", "usage"}`` out."""
    service = ChatService(state)
    service.check_size(*request.message_count_and_chars())
    prepared = await service.prepare(request, request.template_messages(), request.max_tokens, caller, completion_id())
    result = await service.complete_or_cancel(prepared, http_request.is_disconnected)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    text, finish, usage = result
    return SimpleChatResponse(model=prepared.entry.name, response=text, finish_reason=finish, usage=usage)
