"""`toolkit serve` knows what runs: a second one reports the first and exits 0 (or attaches with --reuse),
a port held by anything else stops it with one line naming the process, and --port auto picks free ports.

Real `toolkit serve` processes on the tiny repository; the gateway port is fixed (18310) so a second
server can collide with it, every other port is auto.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.devrepo import ServedRepository
from tests.integration.conftest import die_with_parent
from toolkit.supervisor.state import process_alive

pytestmark = pytest.mark.integration
GATEWAY_PORT = 18310
TOOLKIT = str(Path(sys.executable).parent / "toolkit")
AUTO_TRITON = ["--http-port", "auto", "--grpc-port", "auto", "--metrics-port", "auto"]


def toolkit(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOOLKIT, *args], capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "COLUMNS": "400"})


def wait_state(log_dir: Path, process: subprocess.Popen[bytes], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, (log_dir / "serve.out").read_text()
        path = log_dir / "state.json"
        if path.is_file() and (state := json.loads(path.read_text()))["status"] == "ready":
            return state
        time.sleep(0.2)
    raise AssertionError(f"not ready:\n{(log_dir / 'serve.out').read_text()}")


@pytest.fixture(scope="module")
def first(tiny_repository: ServedRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The first `toolkit serve`; yields its state file's content (and its process under "process")."""
    log_dir = tmp_path_factory.mktemp("first")
    with (log_dir / "serve.out").open("wb") as out:
        process = subprocess.Popen(
            [TOOLKIT, "serve", "-r", str(tiny_repository.path), "--log-dir", str(log_dir),
             "--port", str(GATEWAY_PORT), *AUTO_TRITON],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent, env={**os.environ, "COLUMNS": "400"})
    try:
        state = wait_state(log_dir, process)
        yield {**state, "process": process}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(60)


def test_first_server_wrote_its_state_and_picked_free_ports(first: dict, tiny_repository: ServedRepository) -> None:
    ports = [first["http_port"], first["grpc_port"], first["metrics_port"]]
    assert len(set(ports)) == 3 and GATEWAY_PORT not in ports and 8000 not in ports
    assert first["gateway_port"] == GATEWAY_PORT and first["models"] == [tiny_repository.model]
    assert first["repository"] == str(tiny_repository.path.resolve())
    assert all(process_alive(first[k]) for k in ("pid", "triton_pid", "gateway_pid"))
    reply = httpx.post(f"http://127.0.0.1:{GATEWAY_PORT}/v1/chat", json={"message": "hi", "max_tokens": 4},
                       timeout=60)
    assert reply.status_code == 200, reply.text


def test_second_serve_reports_the_first_and_exits_0(first: dict, tiny_repository: ServedRepository) -> None:
    started = time.monotonic()
    result = toolkit("serve", "-r", str(tiny_repository.path), "--log-dir", first["log_dir"])
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30  # no start, no restart loop
    assert f"already serving {tiny_repository.path}: http://127.0.0.1:{GATEWAY_PORT}" in result.stderr
    assert f"toolkit serve pid {first['pid']}, Triton pid {first['triton_pid']}" in result.stderr
    assert f"models: {tiny_repository.model}" in result.stderr
    assert "starting Triton" not in result.stderr
    assert all(process_alive(first[k]) for k in ("pid", "triton_pid", "gateway_pid"))


def test_reuse_attaches_and_ctrl_c_detaches(first: dict, tiny_repository: ServedRepository) -> None:
    attach = subprocess.Popen([TOOLKIT, "serve", "-r", str(tiny_repository.path), "--log-dir", first["log_dir"],
                               "--reuse"], stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    time.sleep(3)
    assert attach.poll() is None  # attached: it waits while the server runs
    attach.send_signal(signal.SIGINT)
    _, err = attach.communicate(timeout=30)
    assert attach.returncode == 0 and "attached" in err and "detached; the server keeps running" in err
    assert process_alive(first["pid"]) and process_alive(first["gateway_pid"])


def test_a_port_held_by_another_server_is_one_line_naming_it(
    first: dict, tiny_repository: ServedRepository, tmp_path: Path
) -> None:
    result = toolkit("serve", "-r", str(tiny_repository.path), "--log-dir", str(tmp_path / "other"),
                     "--port", str(GATEWAY_PORT), *AUTO_TRITON)
    assert result.returncode == 5
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: port {GATEWAY_PORT} (gateway) on 127.0.0.1 is in use by pid {first['gateway_pid']}")
    assert f"started by toolkit serve pid {first['pid']}" in line
    assert not (tmp_path / "other" / "tritonserver.log").exists()  # nothing was started
    assert not (tmp_path / "other" / "state.json").exists()


def test_a_port_held_by_anything_else_is_named_too(tiny_repository: ServedRepository, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = toolkit("serve", "-r", str(tiny_repository.path), "--log-dir", str(tmp_path),
                         "--http-port", str(port), "--grpc-port", "auto", "--metrics-port", "auto", "--port", "auto")
    assert result.returncode == 5
    assert f"port {port} (Triton HTTP) on 127.0.0.1 is in use by pid {os.getpid()} (" in result.stderr
    bad = toolkit("serve", "--port", "eighty")
    assert bad.returncode == 2 and "--port must be a port number or 'auto', not 'eighty'" in bad.stderr


def test_clean_stop_removes_the_state_and_every_process(first: dict) -> None:
    process: subprocess.Popen[bytes] = first["process"]
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    assert not (Path(first["log_dir"]) / "state.json").exists()
    assert not any(process_alive(first[k]) for k in ("triton_pid", "gateway_pid"))
