"""The Triton endpoint pool: round-robin over ready endpoints, dead ones out, 503 when none is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import TritonUnavailableError
from gateway.triton import TritonPool, _parse_result

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
