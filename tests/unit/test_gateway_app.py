"""The gateway app end to end over a fake Triton pool: routes, SSE format, error codes and shapes.

The real tokenizer renders and decodes; only Triton is replaced (tests/integration uses a real one).
Expected ids come from tests/reference.py (raw tokenizers + jinja2), not from the gateway's own tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.reference import ReferenceTokenizer
from tests.unit.gateway_fakes import (
    KEY,
    MESSAGES,
    FakePool,
    assert_openai_error,
    make_client,
    sse_events,
    write_repository,
)

REPLY = "Paris is the capital. 巴黎是首都 😀!"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("repo"), context_length=128, max_new_tokens=48)


@pytest.fixture(scope="module")
def reference(repository: Path) -> ReferenceTokenizer:
    return ReferenceTokenizer(repository / "chat" / "1" / "tokenizer")


def reply_ids(reference: ReferenceTokenizer, text: str) -> list[int]:
    return list(reference.raw.encode(text, add_special_tokens=False).ids)


@pytest.fixture
def pool(reference: ReferenceTokenizer) -> FakePool:
    return FakePool(reply_ids(reference, REPLY))


@pytest.fixture
def client(repository: Path, pool: FakePool) -> Iterator[TestClient]:
    with make_client(repository, pool) as test_client:
        yield test_client


def _raw_stream(client: TestClient, body: dict[str, Any]) -> tuple[str, bytes]:
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        return response.headers["content-type"], b"".join(response.iter_raw())


def test_stream_is_framed_like_openai(client: TestClient) -> None:
    content_type, raw = _raw_stream(client, {"messages": MESSAGES, "stream": True, "temperature": 0})
    assert content_type.startswith("text/event-stream")
    assert b"\r" not in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    for event in events[:-2]:  # each event is exactly one `data: {json}` line
        assert event.startswith(b"data: {") and b"\n" not in event, event
        json.loads(event[len(b"data: "):])
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-2]
                   if json.loads(e[6:])["choices"])
    assert text == REPLY


def test_idle_stream_sends_keepalive_comment_lines(repository: Path, reference: ReferenceTokenizer) -> None:
    pool = FakePool(reply_ids(reference, "slow reply"))
    pool.step_delay_s = 0.4
    with make_client(repository, pool, sse_ping_s=0.1) as slow:
        _, raw = _raw_stream(slow, {"messages": MESSAGES, "stream": True})
    events = raw.split(b"\n\n")[:-1]
    pings = [e for e in events if e.startswith(b":")]
    assert pings and all(b"\n" not in p for p in pings)  # a comment line, which SSE clients skip
    assert all(e.startswith((b":", b"data: ")) for e in events)


def test_ignore_eos_reaches_triton(client: TestClient, pool: FakePool) -> None:
    body = {"messages": MESSAGES, "max_tokens": 8, "ignore_eos": True}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert pool.calls[-1].ignore_eos is True
    tensors = {t.name(): t for t in pool.calls[-1].to_infer_inputs()}
    assert tensors["ignore_eos"].datatype() == "BOOL"
    assert client.post("/v1/chat/completions", json={"messages": MESSAGES}).status_code == 200
    assert pool.calls[-1].ignore_eos is False
    assert "ignore_eos" not in {t.name() for t in pool.calls[-1].to_infer_inputs()}


def test_non_streaming_completion(client: TestClient, pool: FakePool, reference: ReferenceTokenizer) -> None:
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0}).json()
    assert body["object"] == "chat.completion" and body["model"] == "chat"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    prompt = reference.render_ids(MESSAGES)
    assert pool.calls[0].prompt_ids == prompt and usage["prompt_tokens"] == len(prompt)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # max_tokens defaults to the rest of the context, capped by the model's limit (not 16).
    assert pool.calls[0].max_tokens == min(128 - len(prompt), 48)
    assert pool.calls[0].temperature == 0.0


def test_streaming_chunks_concatenate_to_the_reply_and_end_with_done(client: TestClient) -> None:
    payload = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == REPLY
    assert all("\ufffd" not in c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_stop_string_across_tokens_is_not_leaked_and_cancels_generation(client: TestClient, pool: FakePool) -> None:
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "stop": ["capital."]}).json()
    assert body["choices"][0]["message"]["content"] == "Paris is the "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert pool.closed_early == 1  # the rest of the generation was cancelled


def test_length_finish_reason(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_simple_chat_endpoint(client: TestClient, reference: ReferenceTokenizer) -> None:
    body = client.post("/v1/chat", json={"message": "Capital of France?"}).json()
    prompt = reference.render_ids([{"role": "user", "content": "Capital of France?"}])
    assert body["response"] == REPLY and body["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_models_health_docs_metrics(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "chat" and models["data"][0]["context_length"] == 128
    assert models["data"][0]["default"] and models["data"][0]["ready"]
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").json()["status"] == "ready"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/chat", "/v1/chat/completions", "/v1/models", "/admin/models/{name}/load"} <= set(paths)
    client.post("/v1/chat/completions", json={"messages": MESSAGES})
    metrics = client.get("/metrics").text
    assert 'gateway_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in metrics
    assert 'gateway_prompt_tokens_total{model="chat"}' in metrics
    assert "gateway_time_to_first_token_seconds_bucket" in metrics


@pytest.mark.parametrize(
    ("body", "status", "fragment", "param"),
    [
        ({"messages": MESSAGES, "n": 2}, 400, "only n=1", "n"),
        ({"messages": MESSAGES, "model": "nope"}, 404, "'nope' does not exist", "model"),
        ({"messages": MESSAGES, "max_tokens": 100}, 400, "maximum context length is 128", "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": 49}, 400, "at most 48", "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 200}]}, 400, "maximum context length is 128", "messages"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop", "stop"),
        ({"messages": MESSAGES, "stream_options": {"include_usage": True}}, 400, "only allowed with stream", None),
        ({"messages": MESSAGES, "frequency_penalty": 1}, 400, "not supported", "frequency_penalty"),
        ({}, 422, "'messages' is required", "messages"),
        ({"messages": MESSAGES, "temperature": "hot"}, 422, "temperature", "temperature"),
        ({"messages": MESSAGES, "beam": 2}, 422, "beam", "beam"),
    ],
)
def test_error_codes_and_openai_shape(client: TestClient, body: dict, status: int, fragment: str, param: Any) -> None:
    assert_openai_error(client.post("/v1/chat/completions", json=body), status, fragment, param)


def test_invalid_json_unknown_route_and_method(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "not valid JSON")
    assert_openai_error(client.get("/v1/nothing"), 404, "Not Found")
    assert_openai_error(client.get("/v1/chat/completions"), 405, "Method Not Allowed")


def test_body_too_large_is_refused_before_parsing(repository: Path, pool: FakePool) -> None:
    with make_client(repository, pool, max_body_bytes=1000) as client:
        big = {"messages": [{"role": "user", "content": "x" * 2000}]}
        assert_openai_error(client.post("/v1/chat/completions", json=big), 413, "larger than the limit of 1000")

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 200
            yield b'"}]}'

        assert_openai_error(client.post("/v1/chat/completions", content=chunks()), 413, "larger than the limit")
        assert not pool.calls


def test_api_keys(repository: Path, pool: FakePool) -> None:
    with make_client(repository, pool, api_keys=[KEY], open_metrics=False) as client:
        assert_openai_error(client.post("/v1/chat", json={"message": "hi"}), 401, "missing API key")
        bad = {"Authorization": "Bearer wrong-key-123456"}
        assert_openai_error(client.post("/v1/chat", json={"message": "hi"}, headers=bad), 401, "invalid API key")
        assert_openai_error(client.get("/v1/models"), 401, "missing API key")
        ok = {"Authorization": f"Bearer {KEY}"}
        assert client.post("/v1/chat", json={"message": "hi"}, headers=ok).status_code == 200
        assert client.get("/health/live").status_code == 200  # open by default
        assert_openai_error(client.get("/metrics"), 401, "missing API key")
        assert client.get("/metrics", headers=ok).status_code == 200
        # admin: no admin key configured, so /admin is closed; an API key never opens it
        assert_openai_error(client.post("/admin/models/chat/load", headers=ok), 403, "admin endpoints are disabled")


def test_host_header_is_checked_only_while_auth_is_off(repository: Path, pool: FakePool) -> None:
    """DNS rebinding: with no keys, a request naming another host is refused in the error shape."""
    with make_client(repository, pool) as client:
        assert client.get("/v1/models").status_code == 200  # Host: localhost
        rebound = client.get("/v1/models", headers={"Host": "evil.example:8080"})
        assert_openai_error(rebound, 400, "host 'evil.example' is not served while auth is off")
        assert client.get("/v1/models", headers={"Host": "[::1]:8080"}).status_code == 200
    with make_client(repository, pool, trusted_hosts=["chat.example.com"]) as client:
        assert client.get("/v1/models", headers={"Host": "chat.example.com"}).status_code == 200
        assert client.get("/v1/models").status_code == 400  # an explicit list replaces the loopback default
    with make_client(repository, pool, api_keys=[KEY]) as client:
        ok = {"Authorization": f"Bearer {KEY}", "Host": "evil.example"}
        assert client.get("/v1/models", headers=ok).status_code == 200  # keys guard instead


def test_docs_and_openapi_can_be_turned_off(repository: Path, pool: FakePool) -> None:
    with make_client(repository, pool, enable_docs=False) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert_openai_error(client.get(path), 404, "Not Found")
        assert client.get("/v1/models").status_code == 200


def test_admin_disabled_without_any_key(client: TestClient) -> None:
    assert_openai_error(client.post("/admin/models/chat/load"), 403, "admin endpoints are disabled")


def test_rate_limit_per_key_with_retry_after(repository: Path, pool: FakePool) -> None:
    with make_client(repository, pool, api_keys=[KEY], rate_limit_requests_per_minute=1) as client:
        headers = {"Authorization": f"Bearer {KEY}"}
        assert client.post("/v1/chat", json={"message": "hi"}, headers=headers).status_code == 200
        response = client.post("/v1/chat", json={"message": "hi"}, headers=headers)
        error = assert_openai_error(response, 429, "1 requests per minute")
        assert error["type"] == "rate_limit_error" and int(response.headers["Retry-After"]) >= 1


def test_in_flight_bound_gives_429_with_retry_after(repository: Path, pool: FakePool) -> None:
    with make_client(repository, pool, max_in_flight=1, retry_after_s=2) as client:
        state = client.app.state.gateway  # type: ignore[attr-defined]
        state.in_flight.acquire()  # one request is in flight
        response = client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
        assert_openai_error(response, 429, "limit of 1 requests in flight")
        assert response.headers["Retry-After"] == "2"
        state.in_flight.release()
        assert client.post("/v1/chat/completions", json={"messages": MESSAGES}).status_code == 200
        assert state.in_flight.count == 0  # released after the request


def test_triton_down_is_503_and_not_ready(repository: Path) -> None:
    with make_client(repository, FakePool([5], healthy=False)) as client:
        response = client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
        error = assert_openai_error(response, 503, "no Triton endpoint is ready")
        assert error["type"] == "service_unavailable"
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health/live").status_code == 200


def test_bad_repository_fails_at_start_up(tmp_path: Path) -> None:
    from gateway.registry import RepositoryError

    with pytest.raises(RepositoryError, match="no chat model"):
        create_app(GatewaySettings(repository=tmp_path))
