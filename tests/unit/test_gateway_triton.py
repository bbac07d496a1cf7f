"""The Triton replica pool: the least loaded ready replica, dead ones out, 503 when none is left; a request
that fails before its first token moved once to another replica, never one that streamed; a generation's
stream is cancelled only while its request is in flight, a complete one is closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

import gateway.triton as triton_module
from gateway.error_responses import GatewayError, TritonUnavailableError
from gateway.metrics import RoutingMetrics
from gateway.triton import GenerationInputs, TritonPool, _parse_result

DEAD = ["127.0.0.1:18190", "127.0.0.1:18191", "127.0.0.1:18192"]  # nothing listens there


async def test_the_least_loaded_ready_replica_is_picked_and_503_when_none() -> None:
    pool = TritonPool(DEAD[:2], probe_timeout_s=1.0, interval_s=60, seed=1)
    try:
        first, second = pool.endpoints
        for replica in (first, second):
            await replica.client.close()
            replica.client = SwitchableClient(up=True)  # type: ignore[assignment]
        await pool.probe_all()
        first.outstanding_tokens = 300  # a long generation runs there
        assert {pool.pick().url for _ in range(20)} == {second.url}
        first.outstanding_tokens = second.outstanding_tokens = 0
        assert {pool.pick().url for _ in range(40)} == {first.url, second.url}  # equal load: both used
        pool.mark_down(first, "connection refused")
        assert {pool.pick().url for _ in range(3)} == {second.url}
        pool.watched_models = {"chat"}
        second.ready_models = set()
        with pytest.raises(TritonUnavailableError, match="no Triton endpoint is ready"):
            pool.pick("chat")  # up, but without the model
        second.ready_models = {"chat"}
        assert pool.pick("chat") is second
    finally:
        await pool.close()


async def test_probe_takes_unreachable_endpoints_out() -> None:
    pool = TritonPool(DEAD[:2], probe_timeout_s=1.0, interval_s=60)
    try:
        await pool.probe_all()
        assert pool.healthy() == []
        assert all(e.last_error for e in pool.endpoints)
        with pytest.raises(TritonUnavailableError) as info:
            pool.pick()
        assert info.value.status_code == 503 and info.value.retry_after_s == 1
    finally:
        await pool.close()


class FakeResult:
    def __init__(self, arrays: dict) -> None:
        self.arrays = arrays

    def as_numpy(self, name: str):  # noqa: ANN201
        return self.arrays.get(name)


def test_parse_streamed_and_final_responses() -> None:
    import numpy as np

    step = _parse_result(FakeResult({"output_ids": np.asarray([[17]]), "finish_reason": np.asarray([[b""]])}))
    assert step.token_ids == [17] and step.finish_reason is None
    final = _parse_result(
        FakeResult(
            {
                "output_ids": np.zeros((1, 0), np.int64),
                "finish_reason": np.asarray([[b"length"]], dtype=object),
                "prompt_tokens": np.asarray([[5]], np.int32),
                "completion_tokens": np.asarray([[9]], np.int32),
            }
        )
    )
    assert (final.token_ids, final.finish_reason, final.prompt_tokens, final.completion_tokens) == ([], "length", 5, 9)


class SwitchableClient:
    """Answers health probes as told: down (connection refused) or ready."""

    def __init__(self, up: bool = False) -> None:
        self.up = up

    async def is_server_ready(self, client_timeout: float | None = None) -> bool:
        if not self.up:
            raise ConnectionError("connection refused")
        return True

    async def is_model_ready(self, name: str, client_timeout: float | None = None) -> bool:
        return self.up

    async def close(self) -> None:
        return None


async def test_dead_endpoint_is_out_until_a_probe_finds_it_ready_again() -> None:
    pool = TritonPool(DEAD[:1], probe_timeout_s=1.0, interval_s=60)
    await pool.endpoints[0].client.close()
    client = SwitchableClient()
    pool.endpoints[0].client = client  # type: ignore[assignment]
    pool.watched_models = {"chat"}
    await pool.probe_all()
    with pytest.raises(TritonUnavailableError, match="connection refused"):
        pool.pick("chat")
    client.up = True
    await pool.probe_all()
    assert pool.pick("chat") is pool.endpoints[0]
    await pool.close()


class ReloadingClient(SwitchableClient):
    """A Triton in a version switch: strict server readiness is false, the model itself is ready."""

    async def is_server_ready(self, client_timeout: float | None = None) -> bool:
        return False

    async def is_model_ready(self, name: str, client_timeout: float | None = None) -> bool:
        return name == "chat"


async def test_endpoint_serves_its_ready_models_while_another_version_unloads() -> None:
    pool = TritonPool(DEAD[:1], probe_timeout_s=1.0, interval_s=60)
    await pool.endpoints[0].client.close()
    pool.endpoints[0].client = ReloadingClient()  # type: ignore[assignment]
    pool.watched_models = {"chat", "other"}
    await pool.probe_all()
    assert pool.pick("chat") is pool.endpoints[0]
    with pytest.raises(TritonUnavailableError, match="no Triton endpoint is ready"):
        pool.pick("other")
    await pool.close()


# -- how a generation's gRPC stream ends: cancelled only while its request is in flight ---------------------------


def _token(token: int) -> FakeResult:
    import numpy as np

    return FakeResult({"output_ids": np.asarray([[token]]), "finish_reason": np.asarray([[b""]])})


def _final(reason: str = "stop") -> FakeResult:
    import numpy as np

    return FakeResult({"output_ids": np.zeros((1, 0), np.int64), "finish_reason": np.asarray([[reason.encode()]]),
                       "prompt_tokens": np.asarray([[3]]), "completion_tokens": np.asarray([[2]])})


class FakeCall:
    """tritonclient's stream_infer iterator: the scripted responses, then the end of the call once the
    client half-closed (its request iterator ended), as Triton does; or never, when `hangs`."""

    def __init__(self, requests: AsyncIterator[dict[str, Any]], script: list[tuple[Any, Any]], hangs: bool) -> None:
        self.requests, self.script, self.hangs = requests, list(script), hangs
        self.cancelled = False
        self.half_closed = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self._writer: asyncio.Task[None] | None = None

    async def _write(self) -> None:
        async for request in self.requests:
            self.sent.append(request)
        self.half_closed.set()

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> tuple[Any, Any]:
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write())
        if self.cancelled:
            raise asyncio.CancelledError
        if self.script:
            await asyncio.sleep(0)
            return self.script.pop(0)
        await self.half_closed.wait()
        if self.hangs:
            await asyncio.sleep(3600)
        raise StopAsyncIteration

    def cancel(self) -> bool:
        self.cancelled = True
        if self._writer is not None:
            self._writer.cancel()
        return True


class StreamingClient(SwitchableClient):
    def __init__(self, script: list[tuple[Any, Any]], hangs: bool = False) -> None:
        super().__init__(up=True)
        self.script, self.hangs = script, hangs
        self.calls: list[FakeCall] = []

    def stream_infer(self, inputs_iterator: AsyncIterator[dict[str, Any]], stream_timeout: float | None = None) \
            -> FakeCall:
        self.calls.append(FakeCall(inputs_iterator, self.script, self.hangs))
        return self.calls[-1]


async def _streaming_pool(*clients: StreamingClient, registry: CollectorRegistry | None = None) -> TritonPool:
    """A pool of one replica per client, probed ready; its routing metrics in `registry`."""
    metrics = RoutingMetrics(registry or CollectorRegistry())
    pool = TritonPool(DEAD[: len(clients)], probe_timeout_s=1.0, interval_s=60, seed=0, metrics=metrics)
    for replica, client in zip(pool.endpoints, clients, strict=True):
        await replica.client.close()
        replica.client = client  # type: ignore[assignment]
    await pool.probe_all()
    return pool


INPUTS = GenerationInputs(prompt_ids=[1, 2, 3], max_tokens=8)


async def test_a_complete_stream_is_half_closed_and_ended_by_triton_never_cancelled() -> None:
    client = StreamingClient([(_token(7), None), (_token(8), None), (_final(), None)])
    pool = await _streaming_pool(client)
    steps = [step async for step in pool.generate("chat", INPUTS, timeout_s=10)]
    assert [s.token_ids for s in steps] == [[7], [8], []] and steps[-1].finish_reason == "stop"
    [call] = client.calls
    assert call.half_closed.is_set() and not call.cancelled and len(call.sent) == 1


async def test_a_consumer_that_stops_at_the_final_response_does_not_cancel() -> None:
    client = StreamingClient([(_token(7), None), (_final(), None)])
    pool = await _streaming_pool(client)
    stream = pool.generate("chat", INPUTS, timeout_s=10)
    async with aclosing(stream):
        async for step in stream:
            if step.finish_reason is not None:
                break
    assert not client.calls[0].cancelled and client.calls[0].half_closed.is_set()


async def test_an_abandoned_stream_is_cancelled() -> None:
    client = StreamingClient([(_token(7), None), (_token(8), None), (_final(), None)])
    pool = await _streaming_pool(client)
    stream = pool.generate("chat", INPUTS, timeout_s=10)
    async with aclosing(stream):
        async for _ in stream:
            break  # e.g. a stop string matched, or the HTTP client went away
    assert client.calls[0].cancelled


async def test_an_error_response_ends_the_stream_without_cancelling() -> None:
    client = StreamingClient([(None, InferenceServerException(msg="server busy: 64 requests already queued"))])
    pool = await _streaming_pool(client)
    with pytest.raises(GatewayError) as info:
        [step async for step in pool.generate("chat", INPUTS, timeout_s=10)]
    assert info.value.status_code == 429
    assert not client.calls[0].cancelled and client.calls[0].half_closed.is_set()


async def test_a_stream_triton_does_not_end_after_the_final_response_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(triton_module, "CLOSE_TIMEOUT_S", 0.05)
    client = StreamingClient([(_final("length"), None)], hangs=True)
    pool = await _streaming_pool(client)
    steps = [step async for step in pool.generate("chat", INPUTS, timeout_s=10)]
    assert steps[-1].finish_reason == "length" and client.calls[0].cancelled


def test_channels_to_triton_send_keepalive_pings() -> None:
    from gateway.triton import keepalive

    options = keepalive(30.0)
    assert options.keepalive_time_ms == 30_000 and options.keepalive_timeout_ms == 10_000
    assert options.keepalive_permit_without_calls is False  # a server's default refuses idle pings
    # toolkit serve lets Triton accept a ping this often (gRPC's server default is one per 5 min).
    from toolkit.supervisor.triton_server import TritonServer

    flags = TritonServer(Path(".")).command(Path("."))
    interval_ms = int(next(f for f in flags if f.startswith("--grpc-http2-min-recv-ping-interval-without-data="))
                      .rpartition("=")[2])
    assert interval_ms < options.keepalive_time_ms


# -- failover: once to another replica before the first token, never after ---------------------------------------

UNAVAILABLE = InferenceServerException(msg="Socket closed", status="StatusCode.UNAVAILABLE")


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def _collect(pool: TritonPool) -> list[list[int]]:
    return [step.token_ids async for step in pool.generate("chat", INPUTS, timeout_s=10)]


async def test_a_request_refused_before_its_first_token_moves_to_another_replica() -> None:
    registry = CollectorRegistry()
    dead, live = StreamingClient([(None, UNAVAILABLE)]), StreamingClient([(_token(7), None), (_final(), None)])
    pool = await _streaming_pool(dead, live, registry=registry)
    first, second = pool.endpoints
    first.outstanding_tokens = -1  # the pick prefers the replica that will fail
    assert await _collect(pool) == [[7], []]  # the client sees the second replica's answer only
    assert len(dead.calls) == len(live.calls) == 1
    assert not first.healthy and first.down.is_set() and second.healthy
    assert _sample(registry, "gateway_triton_retries_total", replica=first.url, reason="unavailable") == 1
    assert _sample(registry, "gateway_triton_ejections_total", replica=first.url, source="request") == 1
    assert _sample(registry, "gateway_triton_routed_requests_total", replica=second.url) == 1
    assert (first.in_flight, second.in_flight, second.outstanding_tokens) == (0, 0, 0)  # every lease returned


async def test_a_stream_that_fails_after_a_token_is_not_retried() -> None:
    registry = CollectorRegistry()
    dying, live = StreamingClient([(_token(7), None), (None, UNAVAILABLE)]), StreamingClient([(_final(), None)])
    pool = await _streaming_pool(dying, live, registry=registry)
    pool.endpoints[0].outstanding_tokens = -1
    got: list[list[int]] = []
    with pytest.raises(TritonUnavailableError):
        async for step in pool.generate("chat", INPUTS, timeout_s=10):
            got.append(step.token_ids)
    assert got == [[7]] and live.calls == []  # no second generation: the client would see text twice
    assert not pool.endpoints[0].healthy
    assert _sample(registry, "gateway_triton_retries_total", replica=pool.endpoints[0].url, reason="unavailable") == 0


async def test_a_full_queue_moves_the_request_without_taking_the_replica_out() -> None:
    registry = CollectorRegistry()
    busy = StreamingClient([(None, InferenceServerException(msg="server busy: 64 requests already queued"))])
    pool = await _streaming_pool(busy, StreamingClient([(_token(3), None), (_final(), None)]), registry=registry)
    pool.endpoints[0].outstanding_tokens = -1
    assert await _collect(pool) == [[3], []]
    assert pool.endpoints[0].healthy  # busy is not down
    assert _sample(registry, "gateway_triton_retries_total", replica=pool.endpoints[0].url, reason="busy") == 1


async def test_one_replica_alone_is_not_retried() -> None:
    client = StreamingClient([(None, UNAVAILABLE)])
    pool = await _streaming_pool(client)
    with pytest.raises(TritonUnavailableError, match="unavailable"):
        await _collect(pool)
    assert len(client.calls) == 1


async def test_a_request_waiting_on_a_replica_that_is_taken_out_moves_and_is_cancelled_there() -> None:
    registry = CollectorRegistry()
    hung, live = StreamingClient([], hangs=True), StreamingClient([(_token(5), None), (_final(), None)])
    pool = await _streaming_pool(hung, live, registry=registry)
    pool.endpoints[0].outstanding_tokens = -1
    task = asyncio.ensure_future(_collect(pool))
    while not hung.calls:  # the request waits on the hung replica
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert not task.done()
    hung.up = False
    await pool.probe_all()  # the probe finds it down
    assert await asyncio.wait_for(task, 5) == [[5], []]
    assert hung.calls[0].cancelled  # Triton cancels the abandoned request
    assert _sample(registry, "gateway_triton_retries_total", replica=pool.endpoints[0].url, reason="taken_out") == 1
    assert _sample(registry, "gateway_triton_ejections_total", replica=pool.endpoints[0].url, source="probe") == 1


async def test_a_replica_taken_out_after_the_first_token_does_not_cut_the_stream() -> None:
    slow = StreamingClient([(_token(1), None), (_token(2), None), (_final(), None)])
    pool = await _streaming_pool(slow)
    got = []
    async for step in pool.generate("chat", INPUTS, timeout_s=10):
        got.append(step.token_ids)
        if len(got) == 1:
            pool.mark_down(pool.endpoints[0], "probe timed out")  # a slow probe: the stream goes on
    assert got == [[1], [2], []]


async def test_load_follows_each_request_from_dispatch_to_its_end() -> None:
    registry = CollectorRegistry()
    client = StreamingClient([(_token(1), None), (_token(2), None), (_final(), None)])
    pool = await _streaming_pool(client, registry=registry)
    replica = pool.endpoints[0]
    seen = []
    stream = pool.generate("chat", INPUTS, timeout_s=10)
    async with aclosing(stream):
        async for _ in stream:
            seen.append((replica.in_flight, replica.outstanding_tokens))
    assert INPUTS.max_tokens == 8 and seen == [(1, 7), (1, 6), (1, 6)]  # one in flight, 8 tokens less those received
    assert (replica.in_flight, replica.outstanding_tokens) == (0, 0)
    assert _sample(registry, "gateway_triton_replica_in_flight", replica=replica.url) == 0
    assert _sample(registry, "gateway_triton_routed_requests_total", replica=replica.url) == 1
