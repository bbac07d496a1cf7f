"""Routes ``POST /v1/completions``: prompt text or token ids in, no chat template, optional ``echo`` and logprobs.

With ``echo`` and ``logprobs`` the prompt's tokens come back with their log-probabilities (the first
one's is null), which is what evaluation harnesses score log-likelihoods with; the generation model
then prefills that prompt alone and returns every position's logits. Generated tokens' logprobs
include the end-of-turn token that ended the reply, as vLLM's do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from sse_starlette import EventSourceResponse

from gateway.chat.protocol import FinishReason, Usage
from gateway.chat.router import _ERRORS, CLIENT_CLOSED_REQUEST
from gateway.chat.serving import ChatService, Completion, Prepared, PromptPlan, Render, TextEvent, watch_client
from gateway.completions.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Prompt,
    completion_id,
)
from gateway.deps import ApiKey, State
from gateway.error_responses import BadRequestError, GatewayError, error_body
from gateway.openai_logprobs import TokenTexts, completion_logprobs
from gateway.registry import ModelEntry

logger = logging.getLogger("gateway")
router = APIRouter(tags=["completions"])


def _check_options(request: CompletionRequest) -> None:
    if request.n != 1 or (request.best_of or 1) != 1:
        raise BadRequestError("only n=1 and best_of=1 are supported", param="n")
    if request.suffix:
        raise BadRequestError("suffix is not supported", param="suffix")
    if request.logit_bias:
        raise BadRequestError("logit_bias is not supported", param="logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise BadRequestError(f"{name} is not supported (use repetition_penalty)", param=name)
    if request.stream_options is not None and not request.stream:
        raise BadRequestError("stream_options is only allowed with stream=true", param="stream_options")
    if request.stream and len(request.prompts()) > 1:
        raise BadRequestError("stream=true takes one prompt", param="prompt")


def _render(prompt: Prompt) -> Render:
    def render(entry: ModelEntry) -> PromptPlan:
        if isinstance(prompt, str):
            return PromptPlan(list(entry.tokenizer.tokenizer(prompt)["input_ids"]))
        vocab = entry.manifest.vocab_size
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise BadRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        return PromptPlan(list(prompt))

    return render


def _prompt_text(prepared: Prepared, prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else prepared.entry.tokenizer.decode(prompt)


class _Choice:
    """One choice's text and logprobs, assembled from its events."""

    def __init__(self, prepared: Prepared, prompt: Prompt, request: CompletionRequest):
        self.prepared, self.request = prepared, request
        self.echo_text = _prompt_text(prepared, prompt) if request.echo else ""
        self.texts = TokenTexts(prepared.entry.tokenizer.tokenizer) if request.logprobs is not None else None
        self.offset = len(self.echo_text)

    def logprobs(self, event: TextEvent) -> CompletionLogprobs | None:
        """The logprobs an event brings: the prompt's (echo, first event) and its tokens'."""
        if self.texts is None:
            return None
        with_top = bool(self.request.logprobs)
        parts: list[dict[str, Any]] = []
        if event.prompt_logprobs is not None and self.request.echo:
            parts.append(completion_logprobs(self.texts, self.prepared.inputs.prompt_ids, event.prompt_logprobs,
                                             with_top, 0))
        if event.logprobs is not None:
            part = completion_logprobs(self.texts, list(event.token_ids), event.logprobs, with_top, self.offset)
            self.offset += sum(len(t) for t in part["tokens"])
            parts.append(part)
        if not parts:
            return None
        return CompletionLogprobs(
            tokens=[t for p in parts for t in p["tokens"]],
            token_logprobs=[v for p in parts for v in p["token_logprobs"]],
            top_logprobs=[v for p in parts for v in p["top_logprobs"]] if with_top else None,
            text_offset=[v for p in parts for v in p["text_offset"]],
        )

    def whole(self, result: Completion, index: int) -> CompletionChoice:
        pieces = [lp for lp in (self.logprobs(e) for e in result.events) if lp is not None]
        logprobs = None
        if pieces:
            logprobs = CompletionLogprobs(
                tokens=[t for p in pieces for t in p.tokens],
                token_logprobs=[v for p in pieces for v in p.token_logprobs],
                top_logprobs=[v for p in pieces for v in p.top_logprobs or []] if self.request.logprobs else None,
                text_offset=[v for p in pieces for v in p.text_offset],
            )
        finish = "stop" if result.finish_reason == "stop" else "length"
        return CompletionChoice(text=self.echo_text + result.text, index=index, logprobs=logprobs,
                                finish_reason=finish)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def completions(http_request: Request, state: State, caller: ApiKey, request: CompletionRequest) -> Any:
    """OpenAI-compatible text completions; ``stream=true`` answers with ``text_completion`` events."""
    _check_options(request)
    service = ChatService(state)
    prompts = request.prompts()
    service.check_size(len(prompts), request.message_chars())
    request_id = completion_id()
    echo_logprobs = request.logprobs if request.echo else None
    prepared: list[Prepared] = []
    try:
        for prompt in prompts:
            prepared.append(await service.prepare(request, _render(prompt), request.max_tokens, caller, request_id,
                                                   logprobs=request.logprobs, prompt_logprobs=echo_logprobs))
    except BaseException:
        for done in prepared:
            done.release()
        raise
    model = prepared[0].entry.name
    choices = [_Choice(p, prompt, request) for p, prompt in zip(prepared, prompts, strict=True)]
    if not request.stream:
        async with watch_client(http_request.receive) as client_gone:
            results = await asyncio.gather(*(service.complete_or_cancel(p, client_gone) for p in prepared),
                                           return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if any(r is None for r in results):
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        finished = [r for r in results if isinstance(r, Completion)]
        usage = Usage.of(sum(r.usage.prompt_tokens for r in finished), sum(r.usage.completion_tokens for r in finished))
        return CompletionResponse(id=request_id, model=model, usage=usage, choices=[
            c.whole(r, i) for i, (c, r) in enumerate(zip(choices, finished, strict=True))])
    events = service.generate(prepared[0])
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        prepared[0].release()
        raise
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return EventSourceResponse(_sse(first, events, choices[0], request_id, model, include_usage), sep="\n",
                               ping=state.settings.sse_ping_s, headers={"X-Request-Id": request_id})


async def _sse(first: TextEvent, events: AsyncGenerator[TextEvent, None], choice: _Choice, request_id: str,
               model: str, include_usage: bool) -> AsyncIterator[dict[str, str]]:
    created = int(time.time())

    def chunk(text: str, logprobs: CompletionLogprobs | None, finish: FinishReason | None) -> str:
        body = CompletionResponse(id=request_id, created=created, model=model, choices=[
            CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)])
        data = body.model_dump(mode="json", exclude={"usage"})
        if include_usage:
            data["usage"] = None
        return json.dumps(data, ensure_ascii=False)

    try:
        event: TextEvent | None = first
        text = choice.echo_text
        while event is not None:
            text += event.text
            logprobs = choice.logprobs(event)
            finish: FinishReason | None = None
            if event.finish_reason is not None:
                finish = "stop" if event.finish_reason == "stop" else "length"
            if text or logprobs is not None or finish is not None:
                yield {"data": chunk(text, logprobs, finish)}
            text = ""
            if finish is not None:
                if include_usage and event.usage is not None:
                    data = json.loads(chunk("", None, None))
                    data["choices"] = []
                    data["usage"] = event.usage.model_dump()
                    yield {"data": json.dumps(data)}
                break
            event = await anext(events, None)
    except GatewayError as err:
        yield {"data": json.dumps(error_body(err.status_code, err.message, err.error_type, err.param, err.code))}
    except Exception as err:  # noqa: BLE001 - a stream never ends silently: an error event, then [DONE]
        logger.exception("%s: the stream failed", request_id, exc_info=err)
        yield {"data": json.dumps(error_body(502, f"the generation failed: {type(err).__name__}", "upstream_error",
                                             None, "upstream_error"))}
    finally:
        await events.aclose()
    yield {"data": "[DONE]"}

