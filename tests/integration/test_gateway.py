"""The gateway as a real uvicorn process in front of a real Triton, driven by the `openai` client and httpx.

One gateway per module on 127.0.0.1:18100, on the session's Triton (conftest ``triton_server``) plus
a dead endpoint it must route around; a second gateway on 18101 has only a dead Triton (503s). The
tiny generation model is random, so "correct" means: exactly the text of the tokens Triton itself
generates greedily for the same prompt, decoded in one shot.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import (
    Gateway,
    RunningTriton,
    ServedRepository,
    gateway_over_triton,
    metric_sum,
    scrape,
    start_gateway,
    stop_gateway,
    wait_ready,
)
from tests.reference import ReferenceTokenizer
from toolkit.quality.triton_client import GenerationClient

pytestmark = pytest.mark.integration

KEY = "integration-key-0123456789"
ADMIN_KEY = "integration-admin-0123456789"
GATEWAY_PORT, DOWN_GATEWAY_PORT, SMOLLM_GATEWAY_PORT, DEAD_TRITON_PORT = 18100, 18101, 18102, 18199
MESSAGES: list[Any] = [{"role": "user", "content": "用中文和表情回答 😀: what is the capital of France?"}]
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def gateway(triton_server: RunningTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {
        # a dead endpoint first: the gateway must take it out and use the live one
        "GATEWAY_TRITON_URLS": json.dumps([f"127.0.0.1:{DEAD_TRITON_PORT}", triton_server.grpc_url]),
        "GATEWAY_REPOSITORY": str(triton_server.repository),
        "GATEWAY_API_KEYS": KEY,
        "GATEWAY_ADMIN_API_KEYS": ADMIN_KEY,
        "GATEWAY_TRITON_ADMIN_KEY": triton_server.admin_key,
        "GATEWAY_MAX_IN_FLIGHT": "2",
        "GATEWAY_MAX_BODY_BYTES": "65536",
        "GATEWAY_HEALTH_INTERVAL_S": "0.5",
    }
    running = start_gateway(GATEWAY_PORT, env, tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        wait_ready(running, TIMEOUT_S)
        yield running
    finally:
        stop_gateway(running)


@pytest.fixture(scope="module")
def tokenizer(triton_server: RunningTriton) -> ReferenceTokenizer:
    """Expected prompts and texts from the raw tokenizers library and jinja2, not the gateway's own code."""
    return ReferenceTokenizer(triton_server.repository / triton_server.model / "1" / "tokenizer")


@pytest.fixture(scope="module")
def oai(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)


def direct_greedy(triton: RunningTriton, prompt_ids: list[int], max_tokens: int) -> list[int]:
    with GenerationClient(triton.grpc_url, triton.model) as client:
        result = client.submit(prompt_ids, max_tokens=max_tokens, temperature=0.0)
        client.wait([result], TIMEOUT_S)
    assert result.error is None, result.error
    return result.tokens


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_openai_client_non_streaming_equals_triton_greedy(
    oai: openai.OpenAI, triton_server: RunningTriton, tokenizer: ReferenceTokenizer
) -> None:
    reply = oai.chat.completions.create(model=triton_server.model, messages=MESSAGES, max_tokens=24, temperature=0)
    expected_ids = direct_greedy(triton_server, tokenizer.render_ids(MESSAGES), 24)
    assert reply.choices[0].message.content == tokenizer.decode(expected_ids)
    assert reply.choices[0].finish_reason == ("stop" if len(expected_ids) < 24 else "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tokenizer.render_ids(MESSAGES))
    assert reply.usage.completion_tokens == len(expected_ids)


def test_openai_client_streaming_is_utf8_clean_and_matches(
    oai: openai.OpenAI, triton_server: RunningTriton, tokenizer: ReferenceTokenizer
) -> None:
    stream = oai.chat.completions.create(
        model=triton_server.model, messages=MESSAGES, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    expected_ids = direct_greedy(triton_server, tokenizer.render_ids(MESSAGES), 40)
    expected = tokenizer.decode(expected_ids)
    assert "".join(deltas) == expected  # so no delta carries a broken character the one-shot decode lacks
    assert sum(1 for d in deltas if d) >= 2, deltas  # it did stream, in pieces
    # Each delta ends where the one-shot decode of the tokens so far ends (less a character still
    # incomplete): text goes out token by token, never cut inside a token's text or a character.
    boundaries = {tokenizer.decode(expected_ids[:n]) for n in range(len(expected_ids) + 1)}
    boundaries |= {tokenizer.raw.decode(expected_ids[:n], skip_special_tokens=True)
                   for n in range(len(expected_ids) + 1)}  # a character known to be broken may go out at once
    sent = ""
    for delta in deltas:
        sent += delta
        assert sent in boundaries, (sent, deltas)
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens == len(expected_ids)


def test_live_stream_read_by_a_client_that_splits_on_blank_lines(
    gateway: Gateway, triton_server: RunningTriton, tokenizer: ReferenceTokenizer
) -> None:
    """A hand-written SSE reader as vLLM's benchmark and many scripts have one: split the raw body on
    b"\n\n", strip "data: ", parse JSON until [DONE]. Also checks the bytes themselves."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", GATEWAY_PORT, timeout=TIMEOUT_S)
    body = {"model": triton_server.model, "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream")
    raw, buffer, parts, done = b"", b"", [], False
    while not done:
        chunk = response.read1(65536)
        if not chunk:
            break
        raw += chunk
        buffer += chunk
        while not done and b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            assert event.startswith(b"data: "), event
            if event == b"data: [DONE]":
                done = True
                break
            choices = json.loads(event[len(b"data: "):])["choices"]
            parts.extend(c["delta"].get("content") or "" for c in choices)
    conn.close()
    assert done, raw[-200:]
    assert b"\r" not in raw and raw.endswith(b"data: [DONE]\n\n")
    assert "".join(parts) == tokenizer.decode(direct_greedy(triton_server, tokenizer.render_ids(MESSAGES), 24))


def test_default_model_and_simple_chat(
    gateway: Gateway, triton_server: RunningTriton, tokenizer: ReferenceTokenizer
) -> None:
    response = httpx.post(f"{gateway.url}/v1/chat", json={"message": "hi", "max_tokens": 5, "temperature": 0},
                          headers=auth(), timeout=TIMEOUT_S)  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    expected_ids = direct_greedy(triton_server, tokenizer.render_ids([{"role": "user", "content": "hi"}]), 5)
    assert body["model"] == triton_server.model  # no model named: the default one
    assert body["response"] == tokenizer.decode(expected_ids) and body["response"]
    assert body["usage"]["completion_tokens"] == len(expected_ids)


def test_models_lists_context_length(oai: openai.OpenAI, triton_server: RunningTriton) -> None:
    models = {m.id: m for m in oai.models.list().data}
    assert triton_server.model in models
    card = models[triton_server.model].model_dump()
    assert card["context_length"] == 1024 and card["ready"] and card["default"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "fragment"),
    [
        ({"messages": MESSAGES}, {}, 401, "missing API key"),
        ({"messages": MESSAGES}, {"Authorization": "Bearer not-a-valid-key"}, 401, "invalid API key"),
        ({"messages": MESSAGES, "model": "no-such-model"}, None, 404, "does not exist"),
        ({"messages": MESSAGES, "n": 3}, None, 400, "only n=1"),
        ({"messages": [{"role": "user", "content": "word " * 1100}]}, None, 400, "maximum context length is 1024"),
        ({"messages": MESSAGES, "max_tokens": 2000}, None, 400, "maximum context length is 1024"),
        ({"messages": "hello"}, None, 422, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 70000}]}, None, 413, "larger than the limit"),
    ],
)
def test_error_cases_have_their_code_and_openai_shape(
    gateway: Gateway, body: dict, headers: dict | None, status: int, fragment: str
) -> None:
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body,
                          headers=auth() if headers is None else headers, timeout=TIMEOUT_S)  # fmt: skip
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]


def _open_stream(client: httpx.Client, gateway: Gateway, max_tokens: int) -> httpx.Response:
    request = client.build_request(
        "POST", f"{gateway.url}/v1/chat/completions", headers=auth(), timeout=TIMEOUT_S,
        json={"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True},
    )  # fmt: skip
    return client.send(request, stream=True)


def _wait_until_generating(metrics_url: str, check: Callable[[], None] = lambda: None) -> None:
    """Wait until Triton reports a sequence in generation, calling `check` between scrapes."""
    deadline = time.monotonic() + TIMEOUT_S
    while metric_sum(scrape(metrics_url), "toolkit_active_sequences") < 1:
        check()
        assert time.monotonic() < deadline, "no request showed in Triton's active sequences"
        time.sleep(0.02)


def _wait_for_one_cancelled(metrics_url: str, before: str, timeout_s: float = 20) -> str:
    """Wait until Triton holds no sequence, assert exactly one more request ended cancelled; return the scrape."""
    deadline = time.monotonic() + timeout_s
    while metric_sum(scrape(metrics_url), "toolkit_active_sequences") > 0:
        assert time.monotonic() < deadline, "the abandoned request still holds its Triton slot"
        time.sleep(0.1)
    after = scrape(metrics_url)
    cancelled = metric_sum(after, "toolkit_requests_total", finish_reason="cancelled") - metric_sum(
        before, "toolkit_requests_total", finish_reason="cancelled"
    )
    assert cancelled == 1
    return after


def test_disconnect_mid_stream_frees_the_triton_slot(gateway: Gateway, triton_server: RunningTriton) -> None:
    before = scrape(triton_server.metrics_url)
    with httpx.Client() as client:
        response = _open_stream(client, gateway, max_tokens=900)
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines, strict=False)]
        assert any(line.startswith("data: ") for line in received)
        _wait_until_generating(triton_server.metrics_url)  # Triton's gauge may trail the first tokens a little
        response.close()  # the client goes away mid-stream
    after = _wait_for_one_cancelled(triton_server.metrics_url, before)
    completion = metric_sum(after, "toolkit_generated_tokens_total") - metric_sum(
        before, "toolkit_generated_tokens_total"
    )
    assert completion < 900


def test_disconnect_during_a_non_streaming_request_frees_the_slot(
    gateway: Gateway, triton_server: RunningTriton
) -> None:
    """The client leaves while Triton is generating (seen in Triton's own metrics), not after a fixed time."""
    before = scrape(triton_server.metrics_url)
    body = json.dumps({"messages": MESSAGES, "max_tokens": 900, "temperature": 0, "ignore_eos": True}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as connection:
        connection.sendall(head.encode() + body)
        connection.setblocking(False)

        def no_answer_yet() -> None:
            with contextlib.suppress(BlockingIOError):
                pytest.fail(f"the gateway answered before Triton started: {connection.recv(4096)!r}")

        _wait_until_generating(triton_server.metrics_url, no_answer_yet)
    after = _wait_for_one_cancelled(triton_server.metrics_url, before)
    generated = metric_sum(after, "toolkit_generated_tokens_total") - metric_sum(
        before, "toolkit_generated_tokens_total"
    )
    assert generated < 900


def test_in_flight_bound_answers_429_with_retry_after(gateway: Gateway) -> None:
    with httpx.Client() as client:
        streams = [_open_stream(client, gateway, max_tokens=900) for _ in range(2)]
        try:
            assert [s.status_code for s in streams] == [200, 200]
            response = httpx.post(f"{gateway.url}/v1/chat/completions", json={"messages": MESSAGES},
                                  headers=auth(), timeout=TIMEOUT_S)  # fmt: skip
            assert response.status_code == 429, response.text
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
        finally:
            for stream in streams:
                stream.close()
    deadline = time.monotonic() + 20
    while True:  # the slots come back once the streams are gone
        response = httpx.post(f"{gateway.url}/v1/chat", json={"message": "hi", "max_tokens": 2},
                              headers=auth(), timeout=TIMEOUT_S)  # fmt: skip
        if response.status_code == 200:
            break
        assert response.status_code == 429 and time.monotonic() < deadline
        time.sleep(0.2)


def test_admin_loads_a_version_and_makes_it_default(gateway: Gateway, triton_server: RunningTriton) -> None:
    url = f"{gateway.url}/admin/models/{triton_server.model}/load"
    assert httpx.post(url, headers=auth(), json={"version": 1}, timeout=TIMEOUT_S).status_code == 401
    response = httpx.post(url, headers=auth(ADMIN_KEY), json={"version": 1}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "model": triton_server.model, "version": 1, "default": triton_server.model,
        "endpoints": [triton_server.grpc_url],
    }  # fmt: skip
    missing = httpx.post(f"{gateway.url}/admin/models/nope/load", headers=auth(ADMIN_KEY), timeout=TIMEOUT_S)
    assert missing.status_code == 404
    after = httpx.post(f"{gateway.url}/v1/chat", json={"message": "hi", "max_tokens": 3},
                       headers=auth(), timeout=TIMEOUT_S)  # fmt: skip
    assert after.status_code == 200, after.text


def test_gateway_metrics_and_readiness(gateway: Gateway, oai: openai.OpenAI, triton_server: RunningTriton) -> None:
    """The counters move by exactly what this test's own requests did (whatever ran before it)."""
    metrics_url = f"{gateway.url}/metrics"
    before = scrape(metrics_url)
    stream = oai.chat.completions.create(
        model=triton_server.model, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 8
    refused = httpx.post(f"{gateway.url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=TIMEOUT_S)
    assert refused.status_code == 401

    def moved(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    deadline = time.monotonic() + 10
    while True:  # a stream is counted once its last byte is out, which may be just after the client read it
        after = scrape(metrics_url)
        if moved("gateway_requests_total", route="/v1/chat/completions", status="200") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert moved("gateway_requests_total", route="/v1/chat/completions", status="200") == 1
    assert moved("gateway_requests_total", route="/v1/chat/completions", status="401") == 1
    assert moved("gateway_time_to_first_token_seconds_count") == 1
    assert 1 <= moved("gateway_inter_token_latency_seconds_count") <= 7  # one per streamed step after the first
    assert moved("gateway_completion_tokens_total") == 8
    assert metric_sum(after, "gateway_triton_endpoint_up", url=f"127.0.0.1:{DEAD_TRITON_PORT}") == 0
    ready = httpx.get(f"{gateway.url}/health/ready", timeout=5).json()
    assert ready["status"] == "ready" and ready["triton"][f"127.0.0.1:{DEAD_TRITON_PORT}"] != "ready"


def test_triton_down_is_503_then_rate_limit_429(triton_server: RunningTriton, tmp_path: Path) -> None:
    env = {
        "GATEWAY_TRITON_URLS": f"127.0.0.1:{DEAD_TRITON_PORT}",
        "GATEWAY_REPOSITORY": str(triton_server.repository),
        "GATEWAY_RATE_LIMIT_REQUESTS_PER_MINUTE": "1",
    }
    down = start_gateway(DOWN_GATEWAY_PORT, env, tmp_path / "gateway.log")
    try:
        assert httpx.get(f"{down.url}/health/live", timeout=5).status_code == 200
        assert httpx.get(f"{down.url}/health/ready", timeout=5).status_code == 503
        body = {"messages": MESSAGES, "stream": True}
        first = httpx.post(f"{down.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
        assert first.status_code == 503 and first.json()["error"]["type"] == "service_unavailable"
        second = httpx.post(f"{down.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
        assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
    finally:
        stop_gateway(down)


def test_bad_settings_stop_the_start_up(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="GATEWAY_REPOSITORY|is not a directory"):
        start_gateway(DOWN_GATEWAY_PORT, {"GATEWAY_REPOSITORY": str(tmp_path / "missing")}, tmp_path / "g.log")


@pytest.fixture(scope="module")
def smollm_stack(smollm_repository: ServedRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """SmolLM2-135M-Instruct in its own Triton (18110-18112) behind a gateway on 18102: real text."""
    logs = tmp_path_factory.mktemp("smollm-stack")
    with gateway_over_triton(smollm_repository.path, [smollm_repository.model], (18110, 18111, 18112),
                             SMOLLM_GATEWAY_PORT, logs) as running:
        yield running


def test_smollm_streams_a_correct_answer(smollm_stack: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{smollm_stack.url}/v1", api_key="unused", timeout=120, max_retries=0)
    model = next(m.id for m in client.models.list().data if m.model_dump()["default"])

    def ask(content: str, max_tokens: int) -> tuple[list[str], str, str | None]:
        messages: list = [{"role": "user", "content": content}]
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
        )
        deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return deltas, whole.choices[0].message.content or "", whole.choices[0].finish_reason

    deltas, whole, finish = ask("What is the capital of France?", 24)
    assert "Paris" in "".join(deltas), deltas
    assert "".join(deltas) == whole and finish == "stop"
    # Chinese, cut by max_tokens: every delta is whole characters, and the stream equals the whole reply.
    deltas, whole, finish = ask("请用中文介绍一下巴黎。", 20)
    assert "".join(deltas) == whole and finish == "length"
    assert any("\u4e00" <= ch <= "\u9fff" for ch in whole)
    assert all("\ufffd" not in d for d in deltas)
