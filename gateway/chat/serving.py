"""The work behind both chat endpoints: prompt, limits, admission, generation, text out.

:meth:`ChatService.prepare` renders the prompt and settles ``max_tokens`` (400s happen here);
:meth:`ChatService.generate` admits the request (429s), drives Triton and yields text deltas that
are UTF-8 safe and never contain a stop string, then one final event with the finish reason and
usage. Closing the iterator early cancels the Triton request and releases the in-flight slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from gateway.chat.protocol import SamplingFields, Usage
from gateway.deps import AppState
from gateway.detokenize import StopMatcher
from gateway.errors import BadRequestError, TooManyRequestsError, TritonUnavailableError
from gateway.registry import ModelEntry
from gateway.triton import GenerationInputs
from toolkit.repository import contract

# OpenAI's default; requests that want greedy output send temperature 0.
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for admission."""

    entry: ModelEntry
    inputs: GenerationInputs
    stop_strings: list[str]
    caller: str
    request_id: str

    @property
    def prompt_tokens(self) -> int:
        return len(self.inputs.prompt_ids)


@dataclass(frozen=True)
class TextEvent:
    """A text delta; the last event has ``finish_reason`` and ``usage`` (and possibly text)."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


class ChatService:
    """Chat generation on the app's shared state."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def prepare(
        self,
        request: SamplingFields,
        messages: list[dict[str, str]],
        max_tokens: int | None,
        caller: str,
        request_id: str,
    ) -> Prepared:
        """Render the prompt, check it against the context, and settle max_tokens and stops (400 on misuse)."""
        entry = self.state.registry.get(request.model)
        prompt_ids = entry.tokenizer.render_ids(messages)
        context = entry.context_length
        if len(prompt_ids) >= context:
            raise BadRequestError(
                f"This model's maximum context length is {context} tokens; the messages are {len(prompt_ids)} "
                f"tokens. Shorten the conversation to at most {context - 1} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        remaining = context - len(prompt_ids)
        limit = entry.max_new_tokens_limit
        if max_tokens is None:
            max_tokens = min(remaining, limit)
        elif max_tokens > remaining:
            raise BadRequestError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, {max_tokens} in the "
                f"completion); ask for at most {remaining} completion tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        elif max_tokens > limit:
            raise BadRequestError(f"max_tokens is {max_tokens}; this model allows at most {limit}", param="max_tokens")
        stops = request.stop_strings()
        if len(stops) > self.state.settings.max_stop_strings:
            raise BadRequestError(
                f"at most {self.state.settings.max_stop_strings} stop strings are allowed", param="stop"
            )
        # A stop string that is one special token (e.g. "<|im_end|>") never shows in decoded text: stop on its id.
        stop_ids = [i for i in (entry.tokenizer.single_token_id(s) for s in stops) if i is not None]
        inputs = request.to_generation_inputs(prompt_ids, max_tokens, DEFAULT_TEMPERATURE, stop_ids)
        return Prepared(entry, inputs, stops, caller, request_id)

    async def generate(self, prepared: Prepared) -> AsyncGenerator[TextEvent, None]:
        """Admit, then stream text events; errors before the first event leave nothing half-sent."""
        state, metrics, model = self.state, self.state.metrics, prepared.entry.name
        try:
            state.in_flight.acquire()
        except TooManyRequestsError:
            metrics.rejections.labels("in_flight").inc()
            raise
        try:
            state.rate_limiter.admit(prepared.caller, prepared.prompt_tokens)
        except TooManyRequestsError:
            state.in_flight.release()
            metrics.rejections.labels("rate_limit").inc()
            raise
        metrics.in_flight.set(state.in_flight.count)
        metrics.prompt_tokens.labels(model).inc(prepared.prompt_tokens)
        detokenizer = prepared.entry.tokenizer.detokenizer(prepared.inputs.prompt_ids)
        stopper = StopMatcher(prepared.stop_strings)
        completion_tokens = 0
        start = last = time.perf_counter()
        try:
            steps = state.pool.generate(
                model, prepared.inputs, state.settings.request_timeout_s, request_id=prepared.request_id
            )
            async with aclosing(steps):
                async for step in steps:
                    now = time.perf_counter()
                    if step.token_ids:
                        if completion_tokens == 0:
                            metrics.ttft.labels(model).observe(now - start)
                        else:
                            metrics.itl.labels(model).observe(now - last)
                        last = now
                        completion_tokens += len(step.token_ids)
                    text = stopper.push(detokenizer.push(step.token_ids))
                    if stopper.stopped:
                        # Leaving the loop closes the stream, which cancels the rest of the generation.
                        yield TextEvent(text, "stop", Usage.of(prepared.prompt_tokens, completion_tokens))
                        return
                    if step.finish_reason is None:
                        if text:
                            yield TextEvent(text)
                        continue
                    if step.finish_reason == contract.FINISH_CANCELLED:
                        raise TritonUnavailableError("Triton cancelled the generation (model unloading?); retry")
                    text += stopper.push(detokenizer.flush())
                    finish = "stop" if stopper.stopped or step.finish_reason == contract.FINISH_STOP else "length"
                    text += stopper.flush()
                    completion_tokens = (
                        step.completion_tokens if step.completion_tokens is not None else completion_tokens
                    )
                    yield TextEvent(text, finish, Usage.of(prepared.prompt_tokens, completion_tokens))
                    return
        finally:
            state.in_flight.release()
            metrics.in_flight.set(state.in_flight.count)
            metrics.completion_tokens.labels(model).inc(completion_tokens)
            state.rate_limiter.charge_completion(prepared.caller, completion_tokens)

    async def complete_or_cancel(
        self, prepared: Prepared, is_disconnected: Callable[[], Awaitable[bool]], poll_s: float = 0.5
    ) -> tuple[str, str, Usage] | None:
        """:meth:`complete`, cancelled (Triton request and all) if the client goes away first; None then."""
        task = asyncio.create_task(self.complete(prepared))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=poll_s)
                if done:
                    return task.result()
                if await is_disconnected():
                    return None
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def complete(self, prepared: Prepared) -> tuple[str, str, Usage]:
        """Non-streaming: the whole reply, its finish reason and usage."""
        parts: list[str] = []
        async with aclosing(self.generate(prepared)) as events:
            async for event in events:
                parts.append(event.text)
                if event.finish_reason is not None:
                    assert event.usage is not None
                    return "".join(parts), event.finish_reason, event.usage
        raise TritonUnavailableError("the generation ended without a final response")
