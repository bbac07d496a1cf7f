"""The work behind both chat endpoints: admission, prompt, limits, generation, text out.

:meth:`ChatService.prepare` admits the request first (429s: the in-flight bound, the per-key cap and
the request rate cost nothing), then renders and tokenizes the prompt in a worker thread, off the
event loop, and settles ``max_tokens`` (400s) and the token rate. The slots it takes are released
exactly once, by :meth:`Prepared.release`, whatever happens next. :meth:`ChatService.generate`
drives Triton and yields text deltas that are UTF-8 safe and never contain a stop string, then one
final event with the finish reason and usage; a Triton that sends nothing for
``token_idle_timeout_s`` ends the generation with a 504. Closing the iterator early cancels the
Triton request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

from starlette.types import Message

from gateway.chat.protocol import ResponseFormat, SamplingFields, Usage
from gateway.deps import AppState
from gateway.detokenize import StopMatcher
from gateway.error_responses import BadRequestError, TooManyRequestsError, TritonUnavailableError, UpstreamTimeoutError
from gateway.registry import ModelEntry
from gateway.triton import GenerationInputs, TokenLogprobs
from toolkit.repository import contract

logger = logging.getLogger("gateway")
# OpenAI's default; requests that want greedy output send temperature 0.
DEFAULT_TEMPERATURE = 1.0


@dataclass
class Admission:
    """The slots one request holds: the gateway's in-flight bound and its caller's; released once."""

    state: AppState
    caller: str
    released: bool = False

    @classmethod
    def take(cls, state: AppState, caller: str) -> Admission:
        """Take both slots and charge the request rate, or raise 429 holding nothing."""
        metrics = state.metrics
        taken: list[Callable[[], None]] = []  # what to give back if a later check refuses
        checks: list[tuple[str, Callable[[], None], Callable[[], None]]] = [
            ("in_flight", state.in_flight.acquire, state.in_flight.release),
            ("per_key", lambda: state.per_key.acquire(caller), lambda: state.per_key.release(caller)),
            ("rate_limit", lambda: state.rate_limiter.admit_request(caller), lambda: None),
        ]
        for reason, acquire, release in checks:
            try:
                acquire()
            except TooManyRequestsError:
                for give_back in reversed(taken):  # only the slots this request took
                    give_back()
                metrics.rejections.labels(reason).inc()
                raise
            taken.append(release)
        admission = cls(state, caller)
        metrics.in_flight.set(state.in_flight.count)
        return admission

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.state.in_flight.release()
        self.state.per_key.release(self.caller)
        self.state.metrics.in_flight.set(self.state.in_flight.count)


@dataclass(frozen=True)
class Prepared:
    """An admitted, validated request: its model, Triton inputs, stop strings and the slots it holds."""

    entry: ModelEntry
    inputs: GenerationInputs
    stop_strings: list[str]
    caller: str
    request_id: str
    admission: Admission

    @property
    def prompt_tokens(self) -> int:
        return len(self.inputs.prompt_ids)

    def release(self) -> None:
        self.admission.release()


@dataclass(frozen=True)
class TextEvent:
    """A text delta; the last event has ``finish_reason`` and ``usage`` (and possibly text).

    ``token_ids`` are the tokens this event's step brought (the text may lag them: a character split
    over tokens, a held-back stop string); with log-probabilities requested, ``logprobs`` are theirs
    (the stop token that ended the reply included, as the last one) and the first event carries the
    prompt's ``prompt_logprobs``.
    """

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    token_ids: tuple[int, ...] = ()
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None


class _StepTokens(NamedTuple):
    """A step's tokens and log-probabilities, as TextEvent's last three fields."""

    token_ids: tuple[int, ...]
    logprobs: TokenLogprobs | None
    prompt_logprobs: TokenLogprobs | None


@dataclass(frozen=True)
class Completion:
    """A whole reply: its text, finish reason, usage, and the events it was streamed as (token ids, logprobs)."""

    text: str
    finish_reason: str
    usage: Usage
    events: list[TextEvent]


@dataclass(frozen=True)
class PromptPlan:
    """A request's prompt ids for one model, and the grammar spec its reply must follow (if any)."""

    prompt_ids: list[int]
    grammar: str | None = None


Render = Callable[[ModelEntry], PromptPlan]  # runs in a worker thread (templates and tokenizers are slow)


def chat_prompt(messages: list[dict[str, Any]], response_format: ResponseFormat | None = None) -> Render:
    """The conversation through the model's chat template; the reply follows `response_format` if given."""
    grammar = response_format_spec(response_format)
    return lambda entry: PromptPlan(entry.tokenizer.render_ids(messages), grammar)


def response_format_spec(response_format: ResponseFormat | None) -> str | None:
    """The grammar spec (toolkit.runtime.grammar) of a response_format; None for text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json.dumps({"type": "json_object"})
    assert response_format.json_schema is not None
    return json.dumps({"type": "json_schema", "schema": response_format.json_schema.schema_})


class ChatService:
    """Chat generation on the app's shared state."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def check_size(self, message_count: int, message_chars: int) -> None:
        """400 for more messages or characters than the settings allow (before any work)."""
        settings = self.state.settings
        if message_count > settings.max_messages:
            raise BadRequestError(
                f"{message_count} messages; at most {settings.max_messages} are allowed", param="messages"
            )
        if message_chars > settings.max_message_chars:
            raise BadRequestError(
                f"the messages hold {message_chars} characters; at most {settings.max_message_chars} are allowed",
                param="messages",
            )

    async def prepare(
        self,
        request: SamplingFields,
        render: Render,
        max_tokens: int | None,
        caller: str,
        request_id: str,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> Prepared:
        """Admit (429), render and tokenize off the event loop, settle max_tokens and stops (400).

        `logprobs`/`prompt_logprobs`: alternatives per generated/prompt token (None: no log-probabilities).

        The returned request holds its slots: the caller must end in :meth:`generate` or call
        :meth:`Prepared.release`.
        """
        entry = self.state.registry.get(request.model)
        stops = request.stop_strings()
        if len(stops) > self.state.settings.max_stop_strings:
            raise BadRequestError(
                f"at most {self.state.settings.max_stop_strings} stop strings are allowed", param="stop"
            )
        admission = Admission.take(self.state, caller)
        try:
            plan, stop_ids = await asyncio.to_thread(_tokenize, entry, render, stops)
            prompt_ids = plan.prompt_ids
            inputs = dataclasses.replace(self._inputs(request, entry, prompt_ids, max_tokens, stop_ids),
                                         grammar=plan.grammar, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
            try:
                self.state.rate_limiter.admit_prompt(caller, len(prompt_ids))
            except TooManyRequestsError:
                self.state.metrics.rejections.labels("rate_limit").inc()
                raise
        except BaseException:
            admission.release()
            raise
        return Prepared(entry, inputs, stops, caller, request_id, admission)

    def _inputs(
        self, request: SamplingFields, entry: ModelEntry, prompt_ids: list[int], max_tokens: int | None,
        stop_ids: list[int],
    ) -> GenerationInputs:
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
        return request.to_generation_inputs(prompt_ids, max_tokens, DEFAULT_TEMPERATURE, stop_ids)

    async def generate(self, prepared: Prepared) -> AsyncGenerator[TextEvent, None]:
        """Stream text events of an admitted request; its slots are released when this ends."""
        state, metrics, model = self.state, self.state.metrics, prepared.entry.name
        idle_s = state.settings.token_idle_timeout_s
        metrics.prompt_tokens.labels(model).inc(prepared.prompt_tokens)
        completion_tokens = 0
        try:
            detokenizer = prepared.entry.tokenizer.detokenizer(prepared.inputs.prompt_ids)
            stopper = StopMatcher(prepared.stop_strings)
            start = last = time.perf_counter()
            steps = state.pool.generate(
                model, prepared.inputs, state.settings.request_timeout_s, request_id=prepared.request_id
            )
            async with aclosing(steps):
                while True:
                    try:
                        async with asyncio.timeout(idle_s):
                            step = await anext(steps)
                    except StopAsyncIteration:
                        raise TritonUnavailableError("the generation ended without a final response") from None
                    except TimeoutError:
                        logger.warning("%s: Triton sent nothing for %g s; cancelling", prepared.request_id, idle_s)
                        raise UpstreamTimeoutError(
                            f"Triton sent nothing for {idle_s:g} s (token_idle_timeout_s); the generation was "
                            "cancelled", retry_after_s=1,
                        ) from None
                    now = time.perf_counter()
                    if step.token_ids:
                        if completion_tokens == 0:
                            metrics.ttft.labels(model).observe(now - start)
                        else:
                            metrics.itl.labels(model).observe(now - last)
                        last = now
                        completion_tokens += len(step.token_ids)
                    text = stopper.push(detokenizer.push(step.token_ids))
                    tokens = _StepTokens(tuple(step.token_ids), step.logprobs, step.prompt_logprobs)
                    if stopper.stopped:
                        # Leaving the loop closes the stream, which cancels the rest of the generation.
                        yield TextEvent(text, "stop", Usage.of(prepared.prompt_tokens, completion_tokens), *tokens)
                        return
                    if step.finish_reason is None:
                        if text or step.token_ids or step.prompt_logprobs is not None:
                            yield TextEvent(text, None, None, *tokens)
                        continue
                    if step.finish_reason == contract.FINISH_CANCELLED:
                        raise TritonUnavailableError("Triton cancelled the generation (model unloading?); retry")
                    text += stopper.push(detokenizer.flush())
                    finish = "stop" if stopper.stopped or step.finish_reason == contract.FINISH_STOP else "length"
                    text += stopper.flush()
                    completion_tokens = (
                        step.completion_tokens if step.completion_tokens is not None else completion_tokens
                    )
                    yield TextEvent(text, finish, Usage.of(prepared.prompt_tokens, completion_tokens), *tokens)
                    return
        finally:
            prepared.release()
            metrics.completion_tokens.labels(model).inc(completion_tokens)
            state.rate_limiter.charge_completion(prepared.caller, completion_tokens)

    async def complete_or_cancel(self, prepared: Prepared, client_gone: asyncio.Future[None]) -> Completion | None:
        """:meth:`complete`, cancelled (Triton request and all) the moment the client goes away; None then.

        ``client_gone`` is :func:`watch_client`'s task: it ends when the connection closes.
        """
        task = asyncio.create_task(self.complete(prepared))
        task.add_done_callback(lambda _: prepared.release())  # also when cancelled before it ran
        try:
            waited: list[asyncio.Future[Any]] = [task, client_gone]
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            return task.result() if task.done() else None
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def complete(self, prepared: Prepared) -> Completion:
        """Non-streaming: the whole reply, its finish reason and usage, and the events it came in."""
        received: list[TextEvent] = []
        async with aclosing(self.generate(prepared)) as events:
            async for event in events:
                received.append(event)
                if event.finish_reason is not None:
                    assert event.usage is not None
                    return Completion("".join(e.text for e in received), event.finish_reason, event.usage, received)
        raise TritonUnavailableError("the generation ended without a final response")


@asynccontextmanager
async def watch_client(receive: Callable[[], Awaitable[Message]]) -> AsyncIterator[asyncio.Task[None]]:
    """A task that ends when the client disconnects, for a handler whose body is already read.

    It listens for ``http.disconnect`` as Starlette's ``StreamingResponse`` does (and vLLM's
    ``with_cancellation``), so a non-streaming request is cancelled at once rather than at the next
    poll; polling ``Request.is_disconnected`` missed a client that left just before the reply ended.
    """

    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.create_task(until_disconnect())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _tokenize(entry: ModelEntry, render: Render, stops: list[str]) -> tuple[PromptPlan, list[int]]:
    """The prompt plan, and the ids of stop strings that are one special token (a worker thread runs this)."""
    tokenizer = entry.tokenizer
    plan = render(entry)
    # A stop string that is one special token (e.g. "<|im_end|>") never shows in decoded text: stop on its id.
    stop_ids = [i for i in (tokenizer.single_token_id(s) for s in stops) if i is not None]
    return plan, stop_ids
