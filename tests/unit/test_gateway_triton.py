"""The Triton endpoint pool: round-robin over ready endpoints, dead ones out, 503 when none is left; a
generation's stream is cancelled only while its request is in flight, a complete one is closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from tritonclient.utils import InferenceServerException

import gateway.triton as triton_module
from gateway.errors import GatewayError, TritonUnavailableError
from gateway.triton import GenerationInputs, TritonPool, _parse_result

DEAD = ["127.0.0.1:18190", "127.0.0.1:18191"]  # nothing listens there


async def test_round_robin_over_healthy_endpoints_and_503_when_none() -> None:
    pool = TritonPool(DEAD, probe_timeout_s=1.0, interval_s=60)
    try:
        first, second = pool.endpoints
        assert [pool.pick().url for _ in range(4)] == [first.url, second.url, first.url, second.url]
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
    pool = TritonPool(DEAD, probe_timeout_s=1.0, interval_s=60)
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

    def __init__(self) -> None:
        self.up = False

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
        super().__init__()
        self.script, self.hangs = script, hangs
        self.calls: list[FakeCall] = []

    def stream_infer(self, inputs_iterator: AsyncIterator[dict[str, Any]], stream_timeout: float | None = None) \
            -> FakeCall:
        self.calls.append(FakeCall(inputs_iterator, self.script, self.hangs))
        return self.calls[-1]


def _streaming_pool(client: StreamingClient) -> TritonPool:
    pool = TritonPool(DEAD[:1], probe_timeout_s=1.0, interval_s=60)
    pool.endpoints[0].client = client  # type: ignore[assignment]
    return pool


INPUTS = GenerationInputs(prompt_ids=[1, 2, 3], max_tokens=8)


async def test_a_complete_stream_is_half_closed_and_ended_by_triton_never_cancelled() -> None:
    client = StreamingClient([(_token(7), None), (_token(8), None), (_final(), None)])
    pool = _streaming_pool(client)
    steps = [step async for step in pool.generate("chat", INPUTS, timeout_s=10)]
    assert [s.token_ids for s in steps] == [[7], [8], []] and steps[-1].finish_reason == "stop"
    [call] = client.calls
    assert call.half_closed.is_set() and not call.cancelled and len(call.sent) == 1


async def test_a_consumer_that_stops_at_the_final_response_does_not_cancel() -> None:
    client = StreamingClient([(_token(7), None), (_final(), None)])
    pool = _streaming_pool(client)
    stream = pool.generate("chat", INPUTS, timeout_s=10)
    async with aclosing(stream):
        async for step in stream:
            if step.finish_reason is not None:
                break
    assert not client.calls[0].cancelled and client.calls[0].half_closed.is_set()


async def test_an_abandoned_stream_is_cancelled() -> None:
    client = StreamingClient([(_token(7), None), (_token(8), None), (_final(), None)])
    pool = _streaming_pool(client)
    stream = pool.generate("chat", INPUTS, timeout_s=10)
    async with aclosing(stream):
        async for _ in stream:
            break  # e.g. a stop string matched, or the HTTP client went away
    assert client.calls[0].cancelled


async def test_an_error_response_ends_the_stream_without_cancelling() -> None:
    client = StreamingClient([(None, InferenceServerException(msg="server busy: 64 requests already queued"))])
    pool = _streaming_pool(client)
    with pytest.raises(GatewayError) as info:
        [step async for step in pool.generate("chat", INPUTS, timeout_s=10)]
    assert info.value.status_code == 429
    assert not client.calls[0].cancelled and client.calls[0].half_closed.is_set()


async def test_a_stream_triton_does_not_end_after_the_final_response_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(triton_module, "CLOSE_TIMEOUT_S", 0.05)
    client = StreamingClient([(_final("length"), None)], hangs=True)
    pool = _streaming_pool(client)
    steps = [step async for step in pool.generate("chat", INPUTS, timeout_s=10)]
    assert steps[-1].finish_reason == "length" and client.calls[0].cancelled


def test_channels_to_triton_send_keepalive_pings() -> None:
    from gateway.triton import keepalive

    options = keepalive(30.0)
    assert options.keepalive_time_ms == 30_000 and options.keepalive_timeout_ms == 10_000
    assert options.keepalive_permit_without_calls is False  # a server's default refuses idle pings
    # toolkit serve lets Triton accept a ping this often (gRPC's server default is one per 5 min).
    from toolkit.serving.triton_server import TritonServer

    flags = TritonServer(Path(".")).command(Path("."))
    interval_ms = int(next(f for f in flags if f.startswith("--grpc-http2-min-recv-ping-interval-without-data="))
                      .rpartition("=")[2])
    assert interval_ms < options.keepalive_time_ms
