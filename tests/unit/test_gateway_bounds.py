"""Bounded inputs, admission before work, per-key caps, bounded state, and streams that always end.

The app runs over the fake Triton pool with the real tokenizer; tests/integration drives a real Triton.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.error_responses import TooManyRequestsError
from gateway.limits import RateLimiter
from gateway.tokenization import ChatTokenizer
from gateway.triton import GenerationInputs, StepOutput
from tests.unit.gateway_fakes import MESSAGES, FakePool, assert_openai_error, make_client, sse_events

KEY = "bounds-key-0123456789"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.gateway_fakes import write_repository

    return write_repository(tmp_path_factory.mktemp("repo"), context_length=128, max_new_tokens=48)


@pytest.fixture
def client(repository: Path) -> Iterator[TestClient]:
    with make_client(repository, FakePool([9906, 28]), max_messages=4, max_message_chars=500) as test_client:
        yield test_client


def _post_raw(client: TestClient, body: str) -> Any:
    return client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ('"top_k": 1099511627776', "top_k", "less than or equal to 1000000"),  # 2**40: wrapped into INT32 before
        ('"top_k": -1', "top_k", "greater than or equal to 0"),
        ('"repetition_penalty": Infinity', "repetition_penalty", "finite number"),  # Python's JSON takes it
        ('"repetition_penalty": 1e6', "repetition_penalty", "less than or equal to 10"),
        ('"temperature": NaN', "temperature", "finite number"),
        ('"seed": 9223372036854775808', "seed", "less than or equal to 9223372036854775807"),  # 2**63: past INT64
        ('"max_tokens": 4294967296', "max_tokens", "less than or equal to 2147483647"),  # past INT32
        ('"stop": "' + "x" * 257 + '"', "stop", "at most 256 characters"),
        ('"stop": ["ok", "' + "y" * 257 + '"]', "stop", "at most 256 characters"),
        ('"n": 100000', "n", "less than or equal to 128"),
    ],
)
def test_numbers_and_stop_strings_are_bounded(client: TestClient, fields: str, param: str, fragment: str) -> None:
    body = '{"messages": [{"role": "user", "content": "hi"}], ' + fields + "}"
    error = assert_openai_error(_post_raw(client, body), 422, fragment)
    assert error["param"].startswith(param), error


@pytest.mark.parametrize(
    "message",
    [
        '{"role": "user", "content": "a\\ud800b"}',  # measured: 500 "internal server error" before
        '{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}',
        '{"role": "user", "content": "hi", "name": "\\ud83d"}',
    ],
)
def test_lone_surrogates_are_a_422_not_a_500(client: TestClient, message: str) -> None:
    error = assert_openai_error(_post_raw(client, '{"messages": [' + message + "]}"), 422, "lone surrogate")
    assert error["param"].startswith("messages")
    simple = client.post("/v1/chat", content='{"message": "x\\ud800"}', headers={"Content-Type": "application/json"})
    assert_openai_error(simple, 422, "lone surrogate", param="message")


def test_message_count_and_characters_are_capped_by_settings(client: TestClient) -> None:
    five = [{"role": "user", "content": "hi"}] * 5
    assert_openai_error(client.post("/v1/chat/completions", json={"messages": five}), 400, "5 messages; at most 4",
                        param="messages")
    big = [{"role": "user", "content": "x" * 501}]
    assert_openai_error(client.post("/v1/chat/completions", json={"messages": big}), 400, "at most 500",
                        param="messages")
    assert_openai_error(client.post("/v1/chat", json={"message": "x" * 501}), 400, "at most 500")


class _CountingTokenizer:
    """Wraps the real tokenizer: counts renders and records the thread they run on."""

    def __init__(self, inner: ChatTokenizer) -> None:
        self.inner = inner
        self.renders = 0
        self.threads: list[int] = []

    def render_ids(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        self.renders += 1
        self.threads.append(threading.get_ident())
        return self.inner.render_ids(messages, add_generation_prompt)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _counting(client: TestClient) -> _CountingTokenizer:
    registry = client.app.state.gateway.registry  # type: ignore[attr-defined]
    entry = registry.get(None)
    counting = _CountingTokenizer(entry.tokenizer)
    object.__setattr__(entry, "tokenizer", counting)
    return counting


def test_admission_comes_before_tokenization_which_runs_off_the_event_loop(repository: Path) -> None:
    pool = FakePool([9906])
    with make_client(repository, pool, api_keys=[KEY], rate_limit_requests_per_minute=1) as client:
        counting = _counting(client)
        headers = {"Authorization": f"Bearer {KEY}"}
        loop_thread = client.portal.call(lambda: threading.get_ident())  # type: ignore[union-attr]
        assert client.post("/v1/chat", json={"message": "hi"}, headers=headers).status_code == 200
        assert counting.renders == 1 and counting.threads[0] != loop_thread  # a worker thread rendered it
        assert_openai_error(client.post("/v1/chat", json={"message": "hi"}, headers=headers), 429, "per minute")
        assert counting.renders == 1  # the refused request cost no rendering or tokenization
        state = client.app.state.gateway  # type: ignore[attr-defined]
        assert state.in_flight.count == 0 and state.per_key.counts == {}


def test_in_flight_refusal_costs_no_tokenization(repository: Path) -> None:
    with make_client(repository, FakePool([9906]), max_in_flight=1) as client:
        counting = _counting(client)
        state = client.app.state.gateway  # type: ignore[attr-defined]
        state.in_flight.acquire()
        assert_openai_error(client.post("/v1/chat", json={"message": "hi"}), 429, "requests in flight")
        assert counting.renders == 0
        state.in_flight.release()


def test_one_key_cannot_take_every_slot(repository: Path) -> None:
    other = "bounds-other-key-9876543210"
    with make_client(repository, FakePool([9906]), api_keys=[KEY, other], max_in_flight=4,
                     max_in_flight_per_key=1) as client:
        state = client.app.state.gateway  # type: ignore[attr-defined]
        state.per_key.acquire(KEY)  # KEY has one request in flight already
        busy = client.post("/v1/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {KEY}"})
        error = assert_openai_error(busy, 429, "requests in flight, its limit")
        assert error["code"] == "too_many_concurrent_requests" and busy.headers["Retry-After"]
        ok = client.post("/v1/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {other}"})
        assert ok.status_code == 200
        state.per_key.release(KEY)
        assert state.per_key.counts == {} and state.in_flight.count == 0


def test_a_refused_request_gives_back_only_what_it_took(repository: Path) -> None:
    with make_client(repository, FakePool([9906]), api_keys=[KEY], max_in_flight=4, max_in_flight_per_key=1) as client:
        state = client.app.state.gateway  # type: ignore[attr-defined]
        state.per_key.acquire(KEY)  # a request of KEY's is in flight
        for _ in range(3):  # each refusal must leave that request's slot held
            refused = client.post("/v1/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {KEY}"})
            assert refused.status_code == 429
            assert state.per_key.counts == {KEY: 1} and state.in_flight.count == 0
        state.per_key.release(KEY)

def test_rate_limit_state_is_bounded_and_drops_the_least_recent_caller() -> None:
    limiter = RateLimiter(requests_per_minute=2, tokens_per_minute=None, clock=lambda: 0.0, max_keys=3)
    limiter.admit("recent", 1)
    limiter.admit("recent", 1)  # its minute's requests are spent; the clock stands still
    for i in range(1000):
        limiter.admit(f"203.0.113.{i}", 1)
        with pytest.raises(TooManyRequestsError):  # "recent" keeps calling, so it is never the one dropped
            limiter.admit("recent", 1)
    assert limiter.tracked_keys == 3
    # Still refused: its spent bucket was kept. Had it been dropped, a fresh full bucket would admit it.
    with pytest.raises(TooManyRequestsError):
        limiter.admit("recent", 1)
    limiter.admit("203.0.113.0", 1)  # long dropped: starts again with a full bucket (two requests, not one)
    limiter.admit("203.0.113.0", 1)


class _StallingPool(FakePool):
    """Sends one token, then nothing: a Triton that hangs (SIGSTOP) mid-stream."""

    def __init__(self, first: list[int], fail_with: Exception | None = None) -> None:
        super().__init__(first)
        self.fail_with = fail_with
        self.cancelled = 0

    async def generate(
        self, model: str, inputs: GenerationInputs, timeout_s: float, request_id: str = ""
    ) -> AsyncGenerator[StepOutput, None]:
        yield StepOutput(self.reply_ids[:1])
        if self.fail_with is not None:
            raise self.fail_with
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield StepOutput([], "stop", 1, 1)  # never reached


def test_a_stalled_triton_ends_the_stream_with_an_error_and_done(repository: Path) -> None:
    pool = _StallingPool([9906])
    with make_client(repository, pool, token_idle_timeout_s=0.5) as client:
        start = time.monotonic()
        with client.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "stream": True}) as response:
            assert response.status_code == 200
            events = sse_events(response)
        elapsed = time.monotonic() - start
        assert events[-1] == "[DONE]" and elapsed < 3
        error = json.loads(events[-2])["error"]
        assert error["type"] == "timeout_error" and "sent nothing for 0.5 s" in error["message"]
        assert pool.cancelled == 1  # the Triton request was cancelled, not left running
        assert client.app.state.gateway.in_flight.count == 0  # type: ignore[attr-defined]
        # Non-streaming: a 504 in the error shape, within the timeout too.
        response = client.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert_openai_error(response, 504, "sent nothing for 0.5 s")


def test_an_unknown_failure_mid_stream_is_an_error_event_then_done(repository: Path) -> None:
    pool = _StallingPool([9906], fail_with=RuntimeError("a bug"))
    with make_client(repository, pool) as client:
        with client.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "stream": True}) as response:
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "upstream_error" and "RuntimeError" in error["message"]
        assert client.app.state.gateway.in_flight.count == 0  # type: ignore[attr-defined]
