"""Triton through tritonclient's asyncio gRPC client: endpoint pool, health checks, streaming generation.

One ``InferenceServerClient`` (one HTTP/2 channel, multiplexing every request) per endpoint,
created once for the app. A background task probes every endpoint; requests go round-robin to the
ready ones, and an endpoint that fails a probe or a call is taken out until a probe finds it
ready again. A generation is one bidirectional stream: closing it early (the HTTP client went
away, a stop string matched) cancels the gRPC call, Triton cancels the request, and the
generation model frees its slot. A stream whose request is complete (its final response, or an
error, came) is never cancelled but closed: the gateway half-closes it and waits for Triton to end
the call. Triton 2.51's gRPC frontend leaks a stream's state, and with it the inference request
and the model version the request ran on, when a cancellation arrives after the final response
while that response's write is still completing; the leaked version never unloads after a switch.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, InferInput, InferRequestedOutput, KeepAliveOptions
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from gateway.error_responses import (
    BadRequestError,
    GatewayError,
    TooManyRequestsError,
    TritonUnavailableError,
    UpstreamTimeoutError,
)
from gateway.metrics import RoutingMetrics
from gateway.replicas import Lease, Replica, ReplicaSet, Resolver, choose, resolve
from toolkit.repository import contract

logger = logging.getLogger("gateway")
_OUTPUTS = (contract.OUTPUT_IDS, contract.FINISH_REASON, contract.PROMPT_TOKENS, contract.COMPLETION_TOKENS)
_LOGPROB_OUTPUTS = (contract.TOKEN_LOGPROBS, contract.TOP_LOGPROB_IDS, contract.TOP_LOGPROBS)
_PROMPT_LOGPROB_OUTPUTS = (contract.PROMPT_TOKEN_LOGPROBS, contract.PROMPT_TOP_LOGPROB_IDS,
                           contract.PROMPT_TOP_LOGPROBS)
CLOSE_TIMEOUT_S = 5.0  # for Triton to end a half-closed stream whose request is complete
MAX_ATTEMPTS = 2  # a request that fails before its first token is tried on one other replica
RECONNECT_BACKOFF_MS = (250, 1000)  # gRPC's first and longest wait before reconnecting a broken channel
# Triton's own words (in a stream's error, which carries no status code) for "this server cannot take
# the request now": the model is unknown or unloaded, the server is not ready, a SIGTERM is draining it
# ("Server is stopping, scheduler for model has stopped accepting new inference requests", measured on
# Triton 2.51 for requests that arrive while its in-flight streams finish), or the python backend's stub
# process died. Each means "try another replica", never a fault of the request or of the model's output.
TRITON_NOT_SERVING = ("is not found", "unknown model", "not ready", "Server is stopping", "is not healthy")
TAKEN_OUT = "replica_taken_out"  # error code of a request whose replica was taken out before its first token


@dataclass(frozen=True)
class GenerationInputs:
    """One generation request in the generation model's terms (``toolkit.repository.contract``)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = contract.DEFAULT_TEMPERATURE
    top_p: float = contract.DEFAULT_TOP_P
    top_k: int = contract.DEFAULT_TOP_K
    seed: int | None = None
    repetition_penalty: float = contract.DEFAULT_REPETITION_PENALTY
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = contract.DEFAULT_IGNORE_EOS
    grammar: str | None = None  # a grammar spec (toolkit.runtime.grammar), JSON
    logprobs: int | None = None  # alternatives per generated token; None: no log-probabilities
    prompt_logprobs: int | None = None  # the same for the prompt's tokens

    def to_infer_inputs(self) -> list[InferInput]:
        """Triton inputs, each with the leading batch dimension of 1 the model's max_batch_size implies.

        The seed, extra stop ids, ignore_eos, grammar and log-probability counts are sent only when set.
        """
        arrays = contract.request_arrays(
            self.prompt_ids, max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed,
            stop_token_ids=self.stop_token_ids or None, ignore_eos=self.ignore_eos or None,
            grammar=self.grammar, logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
        )
        inputs = []
        for name, array in arrays.items():
            tensor = InferInput(name, list(array.shape), contract.input_spec(name).dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of n tokens: each token's [n], and its k best alternatives (ids, values) [n, k]."""

    token: np.ndarray
    top_ids: np.ndarray
    top: np.ndarray


@dataclass(frozen=True)
class StepOutput:
    """One streamed response: new token ids; on the last one, the finish reason and the counts."""

    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: TokenLogprobs | None = None  # of token_ids, when the request asked
    prompt_logprobs: TokenLogprobs | None = None  # on the first response, when the request asked


def _logprobs(result: Any, names: tuple[str, str, str]) -> TokenLogprobs | None:
    token, ids, top = (result.as_numpy(name) for name in names)
    if token is None:
        return None
    token = token.reshape(-1)
    count = token.size
    width = ids.size // count if ids is not None and count else 0
    return TokenLogprobs(token, ids.reshape(count, width) if ids is not None else np.zeros((count, 0), np.int64),
                         top.reshape(count, width) if top is not None else np.zeros((count, 0), np.float32))


def _parse_result(result: Any) -> StepOutput:
    ids = result.as_numpy(contract.OUTPUT_IDS)
    reason = result.as_numpy(contract.FINISH_REASON)
    prompt = result.as_numpy(contract.PROMPT_TOKENS)
    completion = result.as_numpy(contract.COMPLETION_TOKENS)
    reason_text = reason.reshape(-1)[0] if reason is not None and reason.size else b""
    if isinstance(reason_text, bytes):
        reason_text = reason_text.decode()
    return StepOutput(
        token_ids=[int(t) for t in ids.reshape(-1)] if ids is not None else [],
        finish_reason=str(reason_text) or None,
        prompt_tokens=int(prompt.reshape(-1)[0]) if prompt is not None and prompt.size else None,
        completion_tokens=int(completion.reshape(-1)[0]) if completion is not None and completion.size else None,
        logprobs=_logprobs(result, _LOGPROB_OUTPUTS),
        prompt_logprobs=_logprobs(result, _PROMPT_LOGPROB_OUTPUTS),
    )


def _requested_outputs(inputs: GenerationInputs) -> tuple[str, ...]:
    names: tuple[str, ...] = _OUTPUTS
    if inputs.logprobs is not None:
        names += _LOGPROB_OUTPUTS
    if inputs.prompt_logprobs is not None:
        names += _PROMPT_LOGPROB_OUTPUTS
    return names


async def _close_stream(responses: Any, url: str) -> None:
    """End a stream whose request is complete without cancelling it: wait for Triton to finish the call.

    The request iterator has ended, so the client half-closed the stream and Triton finishes the
    call with OK once its last write completed. A cancellation instead can reach Triton 2.51 while
    that write completes; its gRPC frontend then waits for a response callback that never comes,
    and keeps the stream's state, the request and so the model version forever (a version
    switched away from never unloads). Only when Triton does not end the call in time is it cancelled.
    """
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            async for _ in responses:  # nothing is expected after the final response
                pass
    except (TimeoutError, grpc.RpcError, InferenceServerException) as err:
        logger.debug("stream to Triton at %s did not end cleanly (%s); cancelling it", url, type(err).__name__)
        responses.cancel()
    except BaseException:  # cancelled while waiting: never leave the call open
        responses.cancel()
        raise


async def _first_response(stream: AsyncIterator[StepOutput], down: asyncio.Event, address: str) -> StepOutput:
    """The stream's first response, unless the replica is taken out first (then the request is cancelled).

    A request queued on a replica that hangs (SIGSTOP, a stuck host) would otherwise wait for the
    token idle timeout and fail; once a probe or another request finds the replica down, the wait
    is abandoned (cancelling the call cancels the request in Triton) and the request can move.
    """

    async def next_step() -> StepOutput:
        return await anext(stream)

    step = asyncio.ensure_future(next_step())
    taken_out = asyncio.ensure_future(down.wait())
    try:
        await asyncio.wait({step, taken_out}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        taken_out.cancel()
        if not step.done():
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
    if step.cancelled():
        raise TritonUnavailableError(f"Triton at {address} was taken out before the first token", retry_after_s=1,
                                     code=TAKEN_OUT)
    try:
        return step.result()
    except StopAsyncIteration:  # not raised from here: inside an async generator it would become RuntimeError
        raise TritonUnavailableError(f"Triton at {address} ended the stream without a response") from None


def map_triton_error(err: Exception, url: str) -> GatewayError:
    """A Triton or gRPC failure as the gateway error a client should see."""
    if isinstance(err, grpc.RpcError | grpc.aio.AioRpcError):
        code = err.code() if callable(getattr(err, "code", None)) else None
        details = err.details() if callable(getattr(err, "details", None)) else str(err)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return UpstreamTimeoutError(f"Triton at {url} did not finish in time")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return TritonUnavailableError(f"Triton at {url} is unavailable: {details}", retry_after_s=1)
        return GatewayError(f"Triton at {url} failed: {details}", status_code=502)
    message = (err.message() if isinstance(err, InferenceServerException) else str(err)) or type(err).__name__
    status = err.status() if isinstance(err, InferenceServerException) else None
    if contract.SERVER_BUSY_PREFIX in message:  # the generation model's queue bound
        return TooManyRequestsError(message, retry_after_s=1, code="overloaded")
    if contract.SHUTTING_DOWN_PREFIX in message:
        return TritonUnavailableError(f"Triton at {url}: {message}", retry_after_s=1)
    if contract.INVALID_REQUEST_PREFIX in message:  # the client's fault (the gateway let it through)
        return BadRequestError(f"the generation model rejected the request: {message}")
    if status and "UNAVAILABLE" in str(status):
        return TritonUnavailableError(f"Triton at {url} is unavailable: {message}", retry_after_s=1)
    if any(sign in message for sign in TRITON_NOT_SERVING):
        return TritonUnavailableError(f"Triton at {url}: {message}", retry_after_s=1)
    # Anything else (a failed model run, an internal error) is the server's fault, not the request's.
    return GatewayError(f"the generation model failed: {message}", status_code=502, code="upstream_error")


def keepalive(interval_s: float) -> KeepAliveOptions:
    """HTTP/2 pings every `interval_s` while a call is open; no answer in 10 s closes the channel.

    A Triton that stops answering (hung, SIGSTOP, a dead host behind a live TCP path) then fails the
    open streams with UNAVAILABLE instead of holding them for the request timeout. Triton started by
    ``toolkit serve`` (and the deploy files) accepts a ping every 10 s; gRPC's server default is one
    per 5 minutes without data, which only a Triton silent for a whole minute would meet, and the
    gateway's per-token idle timeout ends such a generation first.
    """
    return KeepAliveOptions(keepalive_time_ms=int(interval_s * 1000), keepalive_timeout_ms=10_000,
                            keepalive_permit_without_calls=False, http2_max_pings_without_data=0)


def channel_options(keepalive_s: float) -> list[tuple[str, int]]:
    """gRPC channel arguments for one Triton replica: tritonclient's defaults, our keepalive, quick reconnects.

    gRPC reconnects a broken channel with exponential backoff up to 120 s by default: a Triton
    restarted after a minute would wait that long for its gateway. Capped at 1 s, a replica that comes
    back is connected (and probed ready) within a couple of seconds.
    """
    options = keepalive(keepalive_s)
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", options.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", options.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(options.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", options.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


Endpoint = Replica  # the name the rest of the gateway used before replicas were resolved from names


class TritonPool:
    """Every Triton replica of the settings: health, load, and one routed, retried generation at a time.

    A background task probes every replica (Triton's readiness and each watched model's); another
    resolves host names again (:class:`~gateway.replicas.ReplicaSet`). A request goes to the replica
    with the least outstanding work (:func:`~gateway.replicas.choose`) among those ready for its
    model. One that fails before its first token, or waits for it on a replica that is taken out
    meanwhile, is sent once more to another replica; one that already streamed tokens is not.
    """

    def __init__(self, urls: list[str], probe_timeout_s: float, interval_s: float, keepalive_s: float = 30.0,
                 resolve_interval_s: float = 5.0, resolver: Resolver = resolve,
                 metrics: RoutingMetrics | None = None, seed: int | None = None) -> None:
        self.replicas = ReplicaSet(
            urls, lambda address: InferenceServerClient(address, channel_args=channel_options(keepalive_s)),
            resolver, metrics)
        self.metrics = self.replicas.metrics
        self._probe_timeout_s = probe_timeout_s
        self._interval_s = interval_s
        self._resolve_interval_s = resolve_interval_s
        self._rng = random.Random(seed)
        self._tasks: list[asyncio.Task[None]] = []
        self.watched_models: set[str] = set()

    @property
    def unresolved(self) -> dict[str, str]:
        """Host names of the settings that have no address now, and why."""
        return dict(self.replicas.unresolved)

    @property
    def endpoints(self) -> list[Replica]:
        """The replicas requests may be sent to when ready (retired ones excluded)."""
        return self.replicas.current()

    async def start(self) -> None:
        """Resolve and probe once (so readiness is right from the start), then keep both up in the background."""
        await self.replicas.refresh()
        await self.probe_all()
        self._tasks = [asyncio.create_task(self._probe_loop(), name="triton-health")]
        if self.replicas.names:
            self._tasks.append(asyncio.create_task(self._resolve_loop(), name="triton-resolve"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.replicas.close()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.probe_all()
                await self.replicas.close_retired()
            except Exception:  # a background task that dies would leave every replica's state frozen
                logger.exception("probing the Triton replicas failed; trying again")

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self._resolve_interval_s)
            try:
                added = await self.replicas.refresh()
                await asyncio.gather(*(self._probe(r) for r in added))  # admitted once ready, not before
            except Exception:
                logger.exception("resolving the Triton replicas failed; trying again")

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in self.endpoints))

    async def _probe(self, replica: Replica) -> None:
        client = replica.client
        try:
            ready = await client.is_server_ready(client_timeout=self._probe_timeout_s)
            models = set()
            for name in self.watched_models:
                if await client.is_model_ready(name, client_timeout=self._probe_timeout_s):
                    models.add(name)
            replica.ready_models = models
            # Strict readiness is false while any model loads or unloads, as in a version switch
            # through the admin endpoint (the old version unloads for a second after the new one is
            # ready): a replica whose watched models are ready keeps serving them meanwhile.
            ready = ready or bool(models)
            error = None if ready else "server not ready"
        except Exception as err:  # noqa: BLE001 - any failure means "not usable now"
            ready, error = False, str(err).splitlines()[0] if str(err) else type(err).__name__
        if not ready:
            self._take_out(replica, error or "not ready", "probe")
        elif not replica.healthy:
            logger.warning("Triton %s is ready", replica.address)
            replica.healthy, replica.down = True, asyncio.Event()
        replica.last_error = error
        self.metrics.up.labels(replica.address).set(int(replica.healthy))

    def mark_down(self, replica: Replica, reason: str) -> None:
        """Take a replica out after a failed call; the next successful probe puts it back."""
        self._take_out(replica, reason, "request")

    def _take_out(self, replica: Replica, reason: str, source: str) -> None:
        if replica.healthy or replica.last_error == "not probed yet":
            logger.warning("Triton %s taken out (%s): %s", replica.address, source, reason)
        if replica.healthy:
            self.metrics.ejections.labels(replica.address, source).inc()
        replica.healthy, replica.last_error = False, reason
        replica.down.set()
        self.metrics.up.labels(replica.address).set(0)

    def healthy(self) -> list[Replica]:
        return [r for r in self.endpoints if r.healthy]

    def pick(self, model: str | None = None, exclude: Sequence[Replica] = ()) -> Replica:
        """The least loaded ready replica for `model` (power of two choices); 503 when none is ready."""
        candidates = [r for r in self.endpoints if r.serves(model, self.watched_models) and r not in exclude]
        if candidates:
            return choose(candidates, self._rng)
        reasons = [f"{r.address}: {r.last_error or 'model not ready'}" for r in self.endpoints]
        reasons += [f"{target}: {why}" for target, why in self.replicas.unresolved.items()]
        raise TritonUnavailableError(f"no Triton endpoint is ready ({'; '.join(reasons) or 'none configured'})",
                                     retry_after_s=1)

    async def generate(
        self, model: str, inputs: GenerationInputs, timeout_s: float, request_id: str = ""
    ) -> AsyncGenerator[StepOutput, None]:
        """Stream the generation model's responses; closing this iterator before the final response
        cancels the Triton request (a complete one's stream is closed, never cancelled).

        A request that fails before its first response (replica unavailable or shutting down, its
        queue full, or the replica taken out while the request waited) is sent once more, to another
        ready replica; the client never sees the first attempt. After a response, a failure is final.
        """
        tried: list[Replica] = []
        while True:
            replica = self.pick(model, exclude=tried)
            tried.append(replica)
            lease = Lease(replica, inputs.max_tokens)
            received = False
            try:
                stream = self._stream(replica, model, inputs, timeout_s, request_id)
                # aclosing: when our consumer stops early, the inner stream is closed now (cancelling
                # the Triton request), not whenever the garbage collector gets to it.
                async with aclosing(stream):
                    step = await _first_response(stream, lease.down, replica.address)
                    while True:
                        received = True
                        lease.consumed(len(step.token_ids))
                        yield step
                        if step.finish_reason is not None:
                            return
                        step = await anext(stream)
            except (TritonUnavailableError, TooManyRequestsError) as err:
                unavailable = isinstance(err, TritonUnavailableError)
                if unavailable and not lease.down.is_set():
                    self.mark_down(replica, err.message)
                if received or len(tried) >= MAX_ATTEMPTS or not self._others_ready(model, tried):
                    raise
                reason = "taken_out" if err.code == TAKEN_OUT else "unavailable" if unavailable else "busy"
                self.metrics.retries.labels(replica.address, reason).inc()
                logger.info("%s: %s; retrying on another Triton replica", request_id or "request", err.message)
            finally:
                lease.release()

    def _others_ready(self, model: str, tried: Sequence[Replica]) -> bool:
        return any(r.serves(model, self.watched_models) and r not in tried for r in self.endpoints)

    async def _stream(
        self, endpoint: Replica, model: str, inputs: GenerationInputs, timeout_s: float, request_id: str
    ) -> AsyncGenerator[StepOutput, None]:
        done = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": model,
                "inputs": inputs.to_infer_inputs(),
                "outputs": [InferRequestedOutput(name) for name in _requested_outputs(inputs)],
                "request_id": request_id,
            }
            await done.wait()  # keep the stream open until the final response (or cancellation)

        responses = endpoint.client.stream_infer(requests(), stream_timeout=timeout_s)
        complete = False  # the request's final response (or an error, always final) came: nothing is in flight
        try:
            async for result, error in responses:
                if error is not None:
                    complete = True
                    raise map_triton_error(error, endpoint.url)
                step = _parse_result(result)
                complete = step.finish_reason is not None
                yield step
                if complete:
                    return
            complete = True  # Triton ended the call
            raise TritonUnavailableError(f"Triton at {endpoint.url} closed the stream before the final response")
        except (grpc.RpcError, InferenceServerException) as err:
            complete = True  # the call failed: it is over
            raise map_triton_error(err, endpoint.url) from None
        except (GatewayError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as err:  # noqa: BLE001 - anything else from the client library is Triton's side: 502
            logger.exception("Triton at %s: unexpected failure", endpoint.url)
            raise GatewayError(f"Triton at {endpoint.url} failed: {type(err).__name__}", status_code=502,
                               code="upstream_error") from err
        finally:
            done.set()  # the request iterator ends: the client half-closes the stream
            if complete:
                await _close_stream(responses, endpoint.url)
            else:
                # Abandoned early: cancelling the call cancels the request in Triton, and the model sees
                # is_cancelled() and frees the slot.
                responses.cancel()
