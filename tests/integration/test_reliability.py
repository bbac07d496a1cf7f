"""Faults with real processes: a full Triton queue, a stalled Triton, a bad gateway setting, closed ports.

One Triton (the tiny model with max_active=1, max_queue=1) and one gateway on loopback serve the
first tests; the `toolkit serve` tests start their own. Every figure a test asserts is one a user
would see: status codes, Retry-After, the events of a stream and when they came, the exit code
and the lines a command printed, which address a port listens on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import (
    TINY_MODEL,
    Gateway,
    metric_sum,
    scrape,
    start_gateway,
    stop_gateway,
    wait_ready,
    write_generation_repository,
)
from toolkit.supervisor.admin_auth import ADMIN_HEADER
from toolkit.supervisor.triton_server import TritonServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HTTP_PORT, GRPC_PORT, METRICS_PORT, GATEWAY_PORT = 18400, 18401, 18402, 18410
IDLE_TIMEOUT_S = 3.0
LONG = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 900, "ignore_eos": True,
        "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def busy(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, Gateway]]:
    """A Triton with one decoding slot and one queue place, and a gateway that would admit far more."""
    root = tmp_path_factory.mktemp("busy-repo")
    write_generation_repository(root, TINY_MODEL, tiny_onnx, context_length=1024, max_new_tokens_limit=1000,
                                max_active=1, max_queue=1)
    server = TritonServer(root, models=[TINY_MODEL], http_port=HTTP_PORT, grpc_port=GRPC_PORT,
                          metrics_port=METRICS_PORT, log_path=root.parent / "tritonserver.log")
    server.start(ready_timeout_s=120)
    env = {"GATEWAY_TRITON_URLS": server.grpc_url, "GATEWAY_REPOSITORY": str(root), "GATEWAY_MAX_IN_FLIGHT": "64",
           "GATEWAY_TOKEN_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S), "GATEWAY_HEALTH_INTERVAL_S": "0.5",
           "GATEWAY_TRITON_ADMIN_KEY": server.admin_key}
    gateway = start_gateway(GATEWAY_PORT, env, root.parent / "gateway.log")
    try:
        wait_ready(gateway)
        yield server, gateway
    finally:
        stop_gateway(gateway)
        server.stop()


def _in_flight(gateway: Gateway) -> float:
    return metric_sum(scrape(f"{gateway.url}/metrics"), "gateway_requests_in_flight")


def _active_sequences(server: TritonServer) -> float:
    return metric_sum(scrape(server.metrics_url), "toolkit_active_sequences")


def _stream(url: str, out: dict[str, Any]) -> None:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=LONG, timeout=120) as response:
        out["status"], out["retry_after"] = response.status_code, response.headers.get("retry-after")
        out["body"] = "".join(response.iter_text())


def test_a_full_triton_queue_is_429_with_retry_after_end_to_end(busy: tuple[TritonServer, Gateway]) -> None:
    server, gateway = busy
    results: list[dict[str, Any]] = [{} for _ in range(8)]
    threads = [threading.Thread(target=_stream, args=(gateway.url, out)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    statuses = sorted(r["status"] for r in results)
    print(f"figures: 8 concurrent streams -> {statuses.count(200)} x 200, {statuses.count(429)} x 429")
    assert set(statuses) == {200, 429} and statuses.count(200) >= 1, statuses
    for refused in (r for r in results if r["status"] == 429):
        error = json.loads(refused["body"])["error"]
        assert error["type"] == "rate_limit_error" and "server busy: " in error["message"]
        assert "max_queue=1" in error["message"] and int(refused["retry_after"]) >= 1
    for served in (r for r in results if r["status"] == 200):
        assert served["body"].rstrip().endswith("data: [DONE]")
    deadline = time.monotonic() + 20
    while _in_flight(gateway) or _active_sequences(server):
        assert time.monotonic() < deadline, "slots did not return to 0"
        time.sleep(0.2)


def test_a_stalled_triton_ends_the_stream_within_the_idle_timeout(busy: tuple[TritonServer, Gateway]) -> None:
    server, gateway = busy
    assert server.process is not None
    pid = server.process.pid
    events: list[tuple[float, str]] = []
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=LONG, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:  # the first content: Triton is decoding
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            for line in lines:
                if line.startswith("data: "):
                    events.append((time.monotonic() - stopped_at, line[6:]))
        finally:
            os.kill(pid, signal.SIGCONT)
    elapsed, last = events[-1]
    print(f"figures: SIGSTOP -> [DONE] after {elapsed:.2f} s (idle timeout {IDLE_TIMEOUT_S:g} s)")
    assert last == "[DONE]" and elapsed <= IDLE_TIMEOUT_S + 2, events[-3:]
    error = json.loads(events[-2][1])["error"]
    assert error["type"] == "timeout_error" and "sent nothing for 3 s" in error["message"]
    # Resumed, Triton sees the cancellation: every slot returns, and it serves again without a restart.
    deadline = time.monotonic() + 20
    while _in_flight(gateway) or _active_sequences(server):
        assert time.monotonic() < deadline, "slots did not return to 0"
        time.sleep(0.2)
    print(f"figures: slots back to 0 {time.monotonic() - deadline + 20:.2f} s after [DONE]")
    reply = httpx.post(f"{gateway.url}/v1/chat", json={"message": "hi", "max_tokens": 3}, timeout=60)
    assert reply.status_code == 200 and server.process is not None and server.process.pid == pid


def _queue_depth(server: TritonServer) -> float:
    return metric_sum(scrape(server.metrics_url), "toolkit_queue_depth")


def _stream_until_cut(url: str, out: dict[str, Any]) -> None:
    try:
        _stream(url, out)
    except httpx.HTTPError as err:  # the gateway is killed under it
        out["error"] = type(err).__name__


def test_a_gateway_killed_while_triton_streams_frees_tritons_slots(busy: tuple[TritonServer, Gateway],
                                                                   tmp_path: Path) -> None:
    """SIGKILL gives the gateway no chance to cancel: Triton must see its gRPC streams break by itself."""
    server, gateway = busy
    assert server.process is not None
    pid = server.process.pid
    doomed = start_gateway(GATEWAY_PORT + 1, {
        "GATEWAY_TRITON_URLS": server.grpc_url, "GATEWAY_REPOSITORY": str(server.repository),
        "GATEWAY_HEALTH_INTERVAL_S": "0.5", "GATEWAY_TRITON_ADMIN_KEY": server.admin_key}, tmp_path / "doomed.log")
    try:
        wait_ready(doomed)
        before = scrape(server.metrics_url)  # the module's Triton is shared: count this test's requests only
        results: list[dict[str, Any]] = [{} for _ in range(2)]  # one decoding (max_active=1), one queued
        threads = [threading.Thread(target=_stream_until_cut, args=(doomed.url, out), daemon=True)
                   for out in results]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while not (_active_sequences(server) == 1 and _queue_depth(server) == 1):
            assert time.monotonic() < deadline, "Triton never held one decoding and one queued sequence"
            time.sleep(0.1)
        doomed.process.kill()
        killed_at = time.monotonic()
        doomed.process.wait()
    finally:
        if doomed.process.poll() is None:
            doomed.process.kill()
    while _active_sequences(server) or _queue_depth(server):
        assert time.monotonic() < killed_at + 10, "Triton kept the killed gateway's sequences for 10 s"
        time.sleep(0.05)
    freed_s = time.monotonic() - killed_at
    print(f"figures: gateway SIGKILLed with 1 decoding + 1 queued stream: Triton's active sequences and queue "
          f"at 0 after {freed_s:.2f} s")
    cancelled = metric_sum(scrape(server.metrics_url), "toolkit_requests_total", finish_reason="cancelled") - \
        metric_sum(before, "toolkit_requests_total", finish_reason="cancelled")
    assert cancelled == 2  # both of the killed gateway's requests, the decoding and the queued one
    reply = httpx.post(f"{gateway.url}/v1/chat", json={"message": "hi", "max_tokens": 3}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert server.process is not None and server.process.pid == pid  # served without a restart


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "toolkit", "serve", "--log-dir", str(tmp_path / "serve"), "--http-port", "auto",
         "--grpc-port", "auto", "--metrics-port", "auto", "--port", "auto", *args],
        env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_bad_gateway_setting_stops_serve_with_one_line_and_no_restart(tiny_repository: Any, tmp_path: Path) -> None:
    started = time.monotonic()
    process = _serve(tmp_path, "--repository", str(tiny_repository.path),
                     env={"GATEWAY_API_KEYS": "change-me-0123456789abcdef"})
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # restarting the gateway, or hanging: either way it never gave up
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"serve still ran 180 s after its gateway refused to start:\n{output[-3000:]}")
    print(f"figures: serve exited {process.returncode} after {time.monotonic() - started:.1f} s")
    assert process.returncode == 5, output  # ServingError's exit code
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert "the gateway refused to start" in errors[0] and "api_keys" in errors[0] and "placeholder" in errors[0]
    assert "Traceback" not in output and "change-me-0123456789abcdef" not in output
    assert output.count("gateway exited") == 0  # never restarted
    triton_pids = [int(line.split("(pid ")[1].split(")")[0]) for line in output.splitlines() if "Triton ready" in line]
    assert triton_pids and not any(_alive(pid) for pid in triton_pids)


V4_MAPPED = "0000000000000000FFFF0000"  # ::ffff:a.b.c.d in /proc/net/tcp6 (gRPC binds IPv4 that way)


def _listening(port: int) -> set[str]:
    """Local IPv4 addresses (hex, as /proc/net/tcp writes them) listening on `port`; "::" for IPv6 any."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address.removeprefix(V4_MAPPED) if address.startswith(V4_MAPPED) else
                          "::" if set(address) == {"0"} and len(address) == 32 else address)
    return found


def test_serve_keeps_triton_on_loopback_and_its_model_control_closed(tiny_repository: Any, tmp_path: Path) -> None:
    key, admin = "reliability-key-0123456789", "reliability-admin-0123456789"
    process = _serve(tmp_path, "--repository", str(tiny_repository.path), "--host", "0.0.0.0",
                     env={"GATEWAY_API_KEYS": key, "GATEWAY_ADMIN_API_KEYS": admin})
    state_file = tmp_path / "serve" / "state.json"
    try:
        deadline = time.monotonic() + 180
        while not (state_file.is_file() and json.loads(state_file.read_text()).get("status") == "ready"):
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.stdout \
                else ""
            time.sleep(0.5)
        state = json.loads(state_file.read_text())
        loopback, anywhere = "0100007F", "00000000"
        for port in (state["http_port"], state["grpc_port"], state["metrics_port"]):
            assert _listening(port) == {loopback}, port
        assert _listening(state["gateway_port"]) == {anywhere}
        triton = f"http://127.0.0.1:{state['http_port']}"
        refused = httpx.post(f"{triton}/v2/repository/models/{tiny_repository.model}/unload", timeout=30)
        assert refused.status_code == 403 and ADMIN_HEADER in refused.text
        assert httpx.post(f"{triton}/v2/repository/index", headers={ADMIN_HEADER: "guess-0123456789abcdef"},
                          timeout=30).status_code == 403
        gateway = f"http://127.0.0.1:{state['gateway_port']}"
        load = f"{gateway}/admin/models/{tiny_repository.model}/load"
        assert httpx.post(load, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 401
        loaded = httpx.post(load, headers={"Authorization": f"Bearer {admin}"}, timeout=120)
        assert loaded.status_code == 200, loaded.text  # the gateway holds the run's secret
        reply = httpx.post(f"{gateway}/v1/chat", json={"message": "hi", "max_tokens": 3},
                           headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert reply.status_code == 200, reply.text
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
