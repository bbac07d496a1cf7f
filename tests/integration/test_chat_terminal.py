"""`toolkit chat` in a real pseudo-terminal (pexpect) against a real gateway and Triton.

- With nothing running it starts `toolkit serve` (every port auto), streams an answer that is
  Triton's own greedy answer (decoded by tests/reference.py) rendered as Markdown, applies slash
  commands, and on /exit stops the gateway and Triton it started and removes their state file.
- With a `toolkit serve` running (auth on) it reuses it and leaves it running; Ctrl-C mid-answer
  stops the generation in Triton (its token counter stops) and the session goes on; a server error
  is one line; Ctrl-C at the prompt leaves.
- `-m` answers once for scripts: text or --json, the question from standard input with `-m -`,
  and 401 / 404 / 429 / server-down as one line and exit code 1.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from rich.console import Console
from rich.markdown import Markdown

from tests.devrepo import ServedRepository
from tests.integration.conftest import die_with_parent, metric_sum, scrape
from tests.reference import ReferenceTokenizer
from toolkit.quality.triton_client import GenerationClient
from toolkit.supervisor.state import process_alive

pytestmark = pytest.mark.integration
TOOLKIT = str(Path(sys.executable).parent / "toolkit")
KEY, LIMITED_KEY = "chat-test-key-0123456789", "chat-limited-key-0123456789"
RATE_LIMIT_PER_MINUTE = 20
QUESTION = "What is the capital of France?"
COLUMNS = 200
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[=>]|\r")
STATS = r"tiny-chat: (\d+) tokens in [\d.]+ s, finish (\w+)"
ERROR = r"error:(?:\x1b\[[\d;]*m)* "  # "error:" is bold red on a terminal


def plain(text: str) -> str:
    """Terminal output without escape sequences, whitespace collapsed (rich wraps and pads lines)."""
    return " ".join(ANSI.sub("", text).split())


def rendered(markdown: str) -> str:
    """What rich prints for `markdown` at the terminal's width, as plain text."""
    console = Console(file=io.StringIO(), width=COLUMNS, color_system=None, force_terminal=False)
    console.print(Markdown(markdown))
    return plain(console.file.getvalue())  # type: ignore[attr-defined]


def spawn(*args: str, env: dict[str, str] | None = None) -> pexpect.spawn:
    return pexpect.spawn(TOOLKIT, ["chat", *args], env={**os.environ, "TERM": "xterm-256color", **(env or {})},
                         dimensions=(50, COLUMNS), encoding="utf-8", codec_errors="replace", timeout=120)


def triton_answer(grpc_port: int, repository: ServedRepository, max_tokens: int) -> str:
    """The greedy answer to QUESTION straight from Triton, the prompt rendered and the reply decoded by the
    reference tokenizer (tests/reference.py): nothing of the gateway or the chat's own code."""
    reference = ReferenceTokenizer(repository.path / repository.model / "1" / "tokenizer")
    with GenerationClient(f"127.0.0.1:{grpc_port}", repository.model) as client:
        result = client.submit(reference.render_ids([{"role": "user", "content": QUESTION}]),
                               max_tokens=max_tokens, temperature=0.0)
        client.wait([result], 60)
    assert result.error is None, result.error
    return reference.decode(result.tokens)


def read_state(log_dir: Path) -> dict:
    return json.loads((log_dir / "state.json").read_text())


def close(child: pexpect.spawn) -> None:
    if child.isalive():
        child.kill(signal.SIGKILL)
    child.close(force=True)


def test_chat_starts_a_server_streams_an_answer_and_stops_what_it_started(
    tiny_repository: ServedRepository, tmp_path: Path
) -> None:
    log_dir = tmp_path / "serve"
    child = spawn("-r", str(tiny_repository.path), "--log-dir", str(log_dir), "--temperature", "0",
                  "--max-tokens", "24")
    try:
        child.expect("no server running; starting toolkit serve")
        child.expect("gateway ready")  # progress relayed from toolkit serve's log
        child.expect("you> ")
        state = read_state(log_dir)
        pids = [state[k] for k in ("pid", "triton_pid", "gateway_pid")]
        assert all(process_alive(p) for p in pids)
        expected = triton_answer(state["grpc_port"], tiny_repository, 24)
        assert expected.strip()  # a reply to look for, not an empty string found anywhere

        child.sendline(QUESTION)
        child.expect(STATS)
        assert int(child.match.group(1)) <= 24
        assert rendered(expected) in plain(child.before)

        child.sendline("/system Answer in one word.")
        child.expect("system prompt set")
        child.sendline("/model")
        child.expect(r"tiny-chat \(version 1, context 1024\)\s+\[default\]")
        child.sendline("/model no-such-model")
        child.expect(ERROR + "no model 'no-such-model'; the models are: tiny-chat")
        child.sendline(f"/save {tmp_path / 'chat.json'}")
        child.expect("saved 2 messages to")
        saved = json.loads((tmp_path / "chat.json").read_text())
        assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]
        assert saved["messages"][2]["content"] == expected

        child.sendline("/exit")
        child.expect(r"stopping the server this chat started \(toolkit serve pid (\d+)\)")
        assert int(child.match.group(1)) == state["pid"]
        child.expect(pexpect.EOF, timeout=60)
        child.close()
        assert child.exitstatus == 0
        assert not any(process_alive(p) for p in pids), "toolkit chat left a server running"
        assert not (log_dir / "state.json").exists()
    finally:
        close(child)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_chat_leaves_no_server_behind(tiny_repository: ServedRepository, tmp_path: Path,
                                               sig: signal.Signals) -> None:
    """SIGTERM: the chat stops its server in order; SIGKILL: the server dies with its parent, and its children too."""
    log_dir = tmp_path / "serve"
    child = spawn("-r", str(tiny_repository.path), "--log-dir", str(log_dir))
    try:
        child.expect("you> ")
        state = read_state(log_dir)
        pids = [state[k] for k in ("pid", "triton_pid", "gateway_pid")]
        child.kill(sig)
        child.expect(pexpect.EOF, timeout=60)
        deadline = time.monotonic() + 60
        while any(process_alive(p) for p in pids):
            assert time.monotonic() < deadline, f"left running after {sig.name}: " + \
                ", ".join(str(p) for p in pids if process_alive(p))
            time.sleep(0.2)
        if sig == signal.SIGTERM:
            assert "stopping the server this chat started" in plain(child.before)
            assert not (log_dir / "state.json").exists()
    finally:
        close(child)


@pytest.fixture(scope="module")
def served(tiny_repository: ServedRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A `toolkit serve` with auth on and a per-key rate limit, started outside the chat."""
    log_dir = tmp_path_factory.mktemp("served")
    env = {**os.environ, "GATEWAY_API_KEYS": f"{KEY},{LIMITED_KEY}",
           "GATEWAY_RATE_LIMIT_REQUESTS_PER_MINUTE": str(RATE_LIMIT_PER_MINUTE)}
    with (log_dir / "serve.out").open("wb") as out:
        process = subprocess.Popen(
            [TOOLKIT, "serve", "-r", str(tiny_repository.path), "--log-dir", str(log_dir), "--port", "auto",
             "--http-port", "auto", "--grpc-port", "auto", "--metrics-port", "auto"],
            stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 120
        while not ((log_dir / "state.json").is_file() and read_state(log_dir)["status"] == "ready"):
            assert process.poll() is None and time.monotonic() < deadline, (log_dir / "serve.out").read_text()
            time.sleep(0.2)
        state = read_state(log_dir)
        yield {**state, "url": f"http://127.0.0.1:{state['gateway_port']}",
               "metrics": f"http://127.0.0.1:{state['metrics_port']}/metrics"}
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0


def test_chat_reuses_a_running_server_and_ctrl_c_stops_the_answer(served: dict) -> None:
    child = spawn("--log-dir", served["log_dir"], env={"TOOLKIT_API_KEY": KEY})
    try:
        child.expect("using the running server: " + re.escape(served["url"]))
        child.expect("you> ")
        child.sendline("/temp 1")  # random weights at temperature 1: the end-of-turn token practically never comes
        child.expect("temperature: 1")
        child.sendline("/max 900")
        child.expect("max tokens: 900")
        before = metric_sum(scrape(served["metrics"]), "toolkit_generated_tokens_total")
        child.sendline("Tell me a long story.")
        deadline = time.monotonic() + 60
        while metric_sum(scrape(served["metrics"]), "toolkit_generated_tokens_total") < before + 30:
            assert time.monotonic() < deadline, "no tokens generated"
            time.sleep(0.1)
        child.sendintr()
        child.expect(r"\[stopped\]")
        assert len(plain(child.before)) > len("Tell me a long story.") + 20  # the streamed part stayed on screen
        child.expect("you> ")
        time.sleep(1.0)
        stopped_at = metric_sum(scrape(served["metrics"]), "toolkit_generated_tokens_total")
        time.sleep(1.0)
        metrics = scrape(served["metrics"])
        assert metric_sum(metrics, "toolkit_generated_tokens_total") == stopped_at < before + 900
        assert metric_sum(metrics, "toolkit_active_sequences") == 0  # Triton freed the slot

        child.sendline("/max 5000")  # accepted here, refused by the gateway: one line, session goes on
        child.expect("max tokens: 5000")
        child.sendline("And then?")
        child.expect(ERROR + r"400: This model's maximum context length is 1024 tokens[^\n]*\n")
        child.sendline("/max 8")
        child.expect("max tokens: 8")
        child.sendline("And then?")
        child.expect(STATS)
        assert int(child.match.group(1)) <= 8

        child.sendintr()  # Ctrl-C at the prompt leaves
        child.expect(pexpect.EOF, timeout=30)
        child.close()
        assert child.exitstatus == 0
        assert "stopping the server" not in plain(child.before)
        assert all(process_alive(served[k]) for k in ("pid", "triton_pid", "gateway_pid"))  # not ours to stop
        assert read_state(Path(served["log_dir"]))["status"] == "ready"
    finally:
        close(child)


def chat_once(*args: str, stdin: str | None = None, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "300"}
    env.pop("TOOLKIT_API_KEY", None)
    return subprocess.run([TOOLKIT, "chat", *args, *(["--api-key", key] if key else [])], input=stdin,
                          capture_output=True, text=True, timeout=120, env=env)


def test_one_shot_answers_for_scripts(served: dict, tiny_repository: ServedRepository) -> None:
    expected = triton_answer(served["grpc_port"], tiny_repository, 12)
    assert expected.strip()
    as_json = chat_once("--log-dir", served["log_dir"], "-m", QUESTION, "--json", "--temperature", "0",
                        "--max-tokens", "12")
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert answer["content"] == expected and answer["model"] == "tiny-chat"
    assert answer["usage"]["completion_tokens"] <= 12 and answer["finish_reason"] in ("stop", "length")
    piped = chat_once("--url", served["url"], "-m", "-", "--temperature", "0", "--max-tokens", "12", stdin=QUESTION)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == expected + "\n"  # not a terminal: the plain text, as it streamed
    empty = chat_once("--url", served["url"], "-m", "-", stdin="  \n")
    assert empty.returncode == 2 and "the question is empty (standard input held nothing)" in empty.stderr


@pytest.mark.parametrize(("args", "key", "fragment"), [
    (["-m", "hi"], "wrong-key-0123456789", "error: 401: invalid API key (pass --api-key"),
    (["-m", "hi", "--model", "no-such-model"], KEY, "error: 404: The model 'no-such-model' does not exist"),
    (["-m", "hi", "--url", "http://127.0.0.1:18399"], KEY, "error: cannot reach the gateway at http://127.0.0.1:18399"),
    (["--json"], KEY, "error: --json needs a question"),
])
def test_one_shot_errors_are_one_line(served: dict, args: list[str], key: str, fragment: str) -> None:
    result = chat_once("--log-dir", served["log_dir"], *args, key=key)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(fragment), result.stderr
    assert result.stdout == ""


def test_rate_limited_key_gets_one_line(served: dict) -> None:
    for _ in range(RATE_LIMIT_PER_MINUTE + 5):
        response = httpx.post(f"{served['url']}/v1/chat", json={"message": "hi", "max_tokens": 1}, timeout=60,
                              headers={"Authorization": f"Bearer {LIMITED_KEY}"})
        if response.status_code == 429:
            break
    result = chat_once("--url", served["url"], "-m", "hi", key=LIMITED_KEY)
    assert result.returncode == 1
    assert "error: 429: " in result.stderr and "(the gateway is busy or rate-limits this key" in result.stderr
