"""``toolkit chat`` without a terminal or a server: slash commands, request bodies, saving, error lines.

The client's HTTP is answered by httpx's MockTransport (pure logic); tests/integration/
test_chat_terminal.py runs the real command in a pseudo-terminal against a real gateway.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from toolkit.terminal_chat.gateway_client import ChatError, GatewayClient, error_line
from toolkit.terminal_chat.session import ChatSession, Command, CommandError, parse_command


@pytest.mark.parametrize(("line", "expected"), [
    ("/reset", (Command.RESET, "")),
    ("  /system  You are terse.  ", (Command.SYSTEM, "You are terse.")),
    ("/MODEL tiny", (Command.MODEL, "tiny")),
    ("/quit", (Command.EXIT, "")),
    ("/temp 0.5", (Command.TEMP, "0.5")),
    ("hello /reset", None),
    ("//not a command", None),
])
def test_parse_command(line: str, expected: tuple[Command, str] | None) -> None:
    assert parse_command(line) == expected


def test_unknown_command_is_one_line() -> None:
    with pytest.raises(CommandError, match=r"unknown command /frobnicate; /help lists them"):
        parse_command("/frobnicate now")


def test_settings_history_and_request_body(tmp_path: Path) -> None:
    session = ChatSession(model="m")
    assert session.request("hi") == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert session.set_system("Be brief.") == "system prompt set"
    assert session.set_temperature("0.2") == "temperature: 0.2"
    assert session.set_max_tokens("64") == "max tokens: 64"
    session.record("hi", "hello")
    body = session.request("again")
    assert body["temperature"] == 0.2 and body["max_tokens"] == 64
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert session.set_temperature("default") == "temperature: the gateway's default"
    assert "temperature" not in session.request("x")
    path = session.save(str(tmp_path / "chat.json"))
    saved = json.loads(path.read_text())
    assert saved["messages"][0] == {"role": "system", "content": "Be brief."} and len(saved["messages"]) == 3
    session.reset()
    assert session.messages() == [{"role": "system", "content": "Be brief."}]
    assert session.set_system("none") == "system prompt cleared" and session.messages() == []


@pytest.mark.parametrize(("method", "argument", "fragment"), [
    ("set_temperature", "hot", "/temp takes a number"),
    ("set_temperature", "3", "from 0 to 2, not 3"),
    ("set_max_tokens", "1.5", "/max takes a whole number"),
    ("set_max_tokens", "0", "from 1"),
    ("save", "", "/save needs a file name"),
    ("save", "/no/such/dir/chat.json", "cannot write"),
])
def test_bad_arguments_are_one_line(method: str, argument: str, fragment: str) -> None:
    session = ChatSession(temperature=0.5)
    with pytest.raises(CommandError, match=fragment) as info:
        getattr(session, method)(argument)
    assert "\n" not in str(info.value)
    assert session.temperature == 0.5  # a bad value changes nothing


def _client(handler: httpx.MockTransport) -> GatewayClient:
    client = GatewayClient("http://gateway.test/v1", api_key="k" * 10)
    client._http = httpx.Client(base_url=client.base_url, transport=handler)
    return client


def _sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


def test_stream_yields_deltas_then_the_final_event_with_usage() -> None:
    chunk = {"model": "m", "choices": [{"delta": {"content": "Hel"}, "finish_reason": None}]}
    done = {"model": "m", "choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]}
    usage = {"model": "m", "choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": 5, "total_tokens": 7}}
    body = b": ping\n\n" + _sse(json.dumps(chunk), json.dumps(done), json.dumps(usage), "[DONE]")
    client = _client(httpx.MockTransport(lambda request: httpx.Response(200, content=body)))
    events = list(client.stream_chat({"messages": []}))
    assert [e.text for e in events] == ["Hel", "lo"]
    assert (events[-1].finish_reason, events[-1].usage["completion_tokens"]) == ("stop", 2)


@pytest.mark.parametrize(("response", "fragment"), [
    (httpx.Response(401, json={"error": {"message": "invalid API key", "type": "authentication_error"}}),
     "401: invalid API key (pass --api-key"),
    (httpx.Response(429, json={"error": {"message": "too many requests in flight"}}, headers={"Retry-After": "1"}),
     "429: too many requests in flight (the gateway is busy"),
    (httpx.Response(404, json={"error": {"message": "The model 'x' does not exist"}}), "404: The model 'x'"),
    (httpx.Response(502, text="<html>bad gateway</html>"), "502: <html>bad gateway</html>"),
    (httpx.Response(200, content=_sse(json.dumps({"error": {"message": "Triton at a:1 is unavailable"}}), "[DONE]")),
     "the answer failed: Triton at a:1 is unavailable"),
    (httpx.Response(200, content=_sse("[DONE]")), "the stream ended before the answer was complete"),
])
def test_errors_are_one_readable_line(response: httpx.Response, fragment: str) -> None:
    client = _client(httpx.MockTransport(lambda request: response))
    with pytest.raises(ChatError) as info:
        list(client.stream_chat({"messages": []}))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unreachable_gateway_says_what_to_do() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    with pytest.raises(ChatError, match=r"cannot reach the gateway at http://gateway.test .*toolkit serve"):
        _client(httpx.MockTransport(refuse)).models()


def test_error_line_without_a_json_body() -> None:
    assert error_line(500, "") == "500: no message"


def test_connect_prefers_url_and_refuses_a_server_without_gateway(tmp_path: Path) -> None:
    import os

    from toolkit.supervisor.state import ServeState, ServeStatus, process_start_ticks, write_state
    from toolkit.terminal_chat.launcher import _wait_ready, connect

    assert connect("http://elsewhere:8080", tmp_path / "repo", tmp_path).url == "http://elsewhere:8080"
    ticks = process_start_ticks(os.getpid())
    assert ticks is not None
    write_state(tmp_path, ServeState(pid=os.getpid(), pid_start_ticks=ticks, repository="/r", host="127.0.0.1",
                                     http_port=1, grpc_port=2, metrics_port=3, gateway_port=None, log_dir=str(tmp_path),
                                     status=ServeStatus.READY))
    with pytest.raises(ChatError, match=r"the running server has no gateway \(toolkit serve --triton-only\)"):
        connect(None, tmp_path / "repo", tmp_path)
    (tmp_path / "state.json").unlink()
    with pytest.raises(ChatError, match="the server that was starting has stopped"):
        _wait_ready(tmp_path, None, 5.0, print)
