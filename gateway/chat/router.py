"""Routes ``POST /v1/chat`` and ``POST /v1/chat/completions`` (streaming as server-sent events)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, Body, Request, Response
from sse_starlette import EventSourceResponse

from gateway.chat.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionCall,
    FunctionDelta,
    SimpleChatRequest,
    SimpleChatResponse,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    completion_id,
    openapi_examples,
)
from gateway.chat.serving import ChatService, TextEvent, chat_prompt, watch_client
from gateway.chat.structured import chat_render, tool_parser
from gateway.deps import ApiKey, State
from gateway.error_responses import BadRequestError, GatewayError, error_body
from gateway.openai_logprobs import TokenTexts, chat_logprobs
from gateway.tools import ToolCallParser

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


def _grammar_param(request: ChatCompletionRequest) -> str:
    return "tools" if request.calls_tools() else "response_format"


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(
    http_request: Request,
    state: State,
    caller: ApiKey,
    request: ChatCompletionRequest = Body(examples=[openapi_examples()]),
) -> Any:
    """OpenAI-compatible chat completions; ``stream=true`` answers with ``chat.completion.chunk`` events.

    ``response_format`` and ``tools`` are enforced by grammar-constrained decoding in the generation model.
    """
    _check_openai_options(request)
    service = ChatService(state)
    service.check_size(*request.message_count_and_chars())
    request_id = completion_id()
    top = (request.top_logprobs or 0) if request.logprobs else None
    prepared = await service.prepare(request, chat_render(request), request.requested_max_tokens(), caller,
                                     request_id, logprobs=top)
    entry = prepared.entry
    texts = TokenTexts(entry.tokenizer.tokenizer) if top is not None else None
    parser = tool_parser(request, entry)
    if not request.stream:
        with _grammar_errors(_grammar_param(request)):
            async with watch_client(http_request.receive) as client_gone:
                result = await service.complete_or_cancel(prepared, client_gone)
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        content: str | None = result.text
        calls = None
        finish = result.finish_reason
        if parser is not None:
            parser.push(result.text)
            parser.finish()
            if parser.calls:
                calls = [ToolCall(id=c.id, function=FunctionCall.model_construct(name=c.name, arguments=c.arguments))
                         for c in parser.calls]
                content = parser.content.strip() or None
                finish = "tool_calls" if finish == "stop" else finish
        logprobs = None
        if texts is not None:
            logprobs = ChoiceLogprobs(content=[lp for e in result.events for lp in _event_logprobs(texts, e)])
        return ChatCompletionResponse(
            id=request_id,
            model=entry.name,
            choices=[Choice(message=AssistantMessage(content=content, tool_calls=calls), finish_reason=finish,
                            logprobs=logprobs)],
            usage=result.usage,
        )
    events = service.generate(prepared)
    try:
        # Wait for the first event before answering, so admission and Triton errors keep their status code.
        with _grammar_errors(_grammar_param(request)):
            first = await anext(events)
    except BaseException:
        await events.aclose()
        prepared.release()  # a generator closed before it started never ran its finally
        raise
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return EventSourceResponse(
        _sse(first, events, _ChunkWriter(request_id, entry.name, include_usage, texts, parser)),
        sep="\n",  # OpenAI's framing, "data: {json}\n\n": many clients split events on "\n\n"
        ping=state.settings.sse_ping_s,
        headers={"X-Request-Id": request_id},
    )


@contextmanager
def _grammar_errors(param: str) -> Iterator[None]:
    """A grammar the generation model refused is the fault of `param` (response_format or tools): say so."""
    try:
        yield
    except BadRequestError as err:
        if "grammar: " in err.message and err.param is None:
            err.param = param
            err.message = f"{param}: {err.message.split('grammar: ', 1)[1]}"
        raise


def _event_logprobs(texts: TokenTexts, event: TextEvent) -> list[TokenLogprob]:
    """The chat logprobs of an event's tokens; special tokens (the end-of-turn) are not content."""
    if event.logprobs is None:
        return []
    keep = [i for i, t in enumerate(event.token_ids) if t not in texts.special]
    entries = chat_logprobs(texts, list(event.token_ids), event.logprobs)
    return [entries[i] for i in keep]


class _ChunkWriter:
    """Builds one stream's ``chat.completion.chunk`` JSON texts (content, tool-call deltas, logprobs)."""

    def __init__(self, request_id: str, model: str, include_usage: bool, texts: TokenTexts | None,
                 parser: ToolCallParser | None):
        self.request_id, self.model, self.include_usage = request_id, model, include_usage
        self.created = int(time.time())
        self.texts, self.parser = texts, parser
        # A text-delta chunk is sent per token: its JSON is built once, split where the text goes.
        data = self.chunk(ChunkChoice(delta=Delta(content=_PLACEHOLDER)))
        self.before, _, self.after = data.partition(json.dumps(_PLACEHOLDER, ensure_ascii=False))

    def chunk(self, choice: ChunkChoice | None) -> str:
        chunk = ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[choice] if choice is not None else []
        )
        data: dict[str, Any] = chunk.model_dump(mode="json", exclude={"usage"})
        for item in data["choices"]:
            item["delta"] = {k: v for k, v in item["delta"].items() if v is not None}
            for call in item["delta"].get("tool_calls", []):
                call["function"] = {k: v for k, v in call["function"].items() if v is not None}
                for key in ("id", "type"):
                    if call[key] is None:
                        del call[key]
            if item.get("logprobs") is None:
                item["logprobs"] = None
        if self.include_usage:
            data["usage"] = None
        return json.dumps(data, ensure_ascii=False)

    def content(self, text: str, logprobs: list[TokenLogprob] | None = None) -> str:
        if logprobs is None:
            return self.before + json.dumps(text, ensure_ascii=False) + self.after
        return self.chunk(ChunkChoice(delta=Delta(content=text), logprobs=ChoiceLogprobs(content=logprobs)))

    def event(self, event: TextEvent) -> Iterator[str]:
        """The chunks of one event: content (with its tokens' logprobs), then tool-call deltas."""
        logprobs = _event_logprobs(self.texts, event) if self.texts is not None else None
        if self.parser is None:
            if event.text or logprobs:
                yield self.content(event.text, logprobs)
            return
        parsed = self.parser.push(event.text)
        if event.finish_reason is not None:
            tail = self.parser.finish()
            parsed.content += tail.content
        if parsed.content or logprobs:
            yield self.content(parsed.content, logprobs)
        for call in parsed.started:
            delta = ToolCallDelta(index=call.index, id=call.id, type="function",
                                  function=FunctionDelta(name=call.name, arguments=""))
            yield self.chunk(ChunkChoice(delta=Delta(tool_calls=[delta])))
        for index, fragment in parsed.arguments:
            delta = ToolCallDelta(index=index, function=FunctionDelta(arguments=fragment))
            yield self.chunk(ChunkChoice(delta=Delta(tool_calls=[delta])))

    def finish_reason(self, reason: str) -> str:
        if self.parser is not None and self.parser.calls and reason == "stop":
            return "tool_calls"
        return reason


_PLACEHOLDER = "\u0000content\u0000"


async def _sse(first: TextEvent, events: AsyncGenerator[TextEvent, None], writer: _ChunkWriter) \
        -> AsyncIterator[dict[str, str]]:
    yield {"data": writer.chunk(ChunkChoice(delta=Delta(role="assistant", content="")))}
    try:
        event: TextEvent | None = first
        while event is not None:
            for data in writer.event(event):
                yield {"data": data}
            if event.finish_reason is not None:
                choice = ChunkChoice(delta=Delta(), finish_reason=writer.finish_reason(event.finish_reason))
                yield {"data": writer.chunk(choice)}
                if writer.include_usage and event.usage is not None:
                    data = json.loads(writer.chunk(None))
                    data["usage"] = event.usage.model_dump()
                    yield {"data": json.dumps(data)}
                break
            event = await anext(events, None)
    except GatewayError as err:
        # Headers are gone: report the error in the stream, as OpenAI-compatible servers do.
        yield {"data": json.dumps(error_body(err.status_code, err.message, err.error_type, err.param, err.code))}
    except Exception as err:  # noqa: BLE001 - a stream never ends silently: an error event, then [DONE]
        logger.exception("%s: the stream failed", writer.request_id, exc_info=err)
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
    prepared = await service.prepare(request, chat_prompt(request.template_messages(), request.response_format),
                                     request.max_tokens, caller, completion_id())
    with _grammar_errors("response_format"):
        async with watch_client(http_request.receive) as client_gone:
            result = await service.complete_or_cancel(prepared, client_gone)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return SimpleChatResponse(model=prepared.entry.name, response=result.text, finish_reason=result.finish_reason,
                              usage=result.usage)
