"""What ``toolkit serve`` knows before it starts: port options, busy ports and who holds them, state file, lock."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from toolkit.errors import ServingError
from toolkit.supervisor.ports import busy_ports, free_ports, listening_pids, owns_port, parse_port, port_free
from toolkit.supervisor.serve import ServeOptions, resolve_ports
from toolkit.supervisor.state import ServeLock, ServeState, ServeStatus, process_start_ticks, read_state, write_state


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


@pytest.mark.parametrize(("text", "expected"), [("8080", 8080), ("auto", None), (" AUTO ", None), (1, 1)])
def test_parse_port(text: str | int, expected: int | None) -> None:
    assert parse_port(text, "--port") == expected


@pytest.mark.parametrize(("text", "fragment"), [("http", "a port number or 'auto'"), ("0", "between 1 and 65535"),
                                                ("70000", "between 1 and 65535")])
def test_parse_port_refuses(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_port(text, "--port")


def test_a_held_port_is_named_with_its_process(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert not port_free("127.0.0.1", port)
    assert listening_pids(port) == [os.getpid()] and owns_port(os.getpid(), port)
    [line] = busy_ports("127.0.0.1", [("gateway", port)])
    assert line.startswith(f"port {port} (gateway) on 127.0.0.1 is in use by pid {os.getpid()} (")
    assert "python" in line
    picked = free_ports("127.0.0.1", 3)
    assert len(set(picked)) == 3 and all(port_free("127.0.0.1", p) for p in picked)


def test_resolve_ports_picks_auto_and_refuses_a_busy_one(listener: socket.socket, tmp_path: Path) -> None:
    options = ServeOptions(repository=tmp_path, http_port=None, grpc_port=None, metrics_port=None, gateway_port=None)
    resolved = resolve_ports(options)
    ports = [resolved.http_port, resolved.grpc_port, resolved.metrics_port, resolved.gateway_port]
    assert None not in ports and len(set(ports)) == 4
    busy = listener.getsockname()[1]
    with pytest.raises(ServingError, match=rf"port {busy} \(Triton gRPC\) .* pid {os.getpid()}"):
        resolve_ports(ServeOptions(repository=tmp_path, grpc_port=busy, http_port=None, metrics_port=None,
                                   gateway_port=None))
    with pytest.raises(ServingError, match="cannot share a port"):
        resolve_ports(ServeOptions(repository=tmp_path, http_port=busy + 1, grpc_port=busy + 1))


def _state(pid: int, ticks: int) -> ServeState:
    return ServeState(pid=pid, pid_start_ticks=ticks, repository="/repo", host="127.0.0.1", http_port=1,
                      grpc_port=2, metrics_port=3, gateway_port=4, log_dir="/logs", models=["m"])


def test_state_round_trip_and_stale_files_are_removed(tmp_path: Path) -> None:
    ticks = process_start_ticks(os.getpid())
    assert ticks is not None
    write_state(tmp_path, _state(os.getpid(), ticks))
    state = read_state(tmp_path)
    assert state is not None and state.status is ServeStatus.STARTING and state.gateway_url == "http://127.0.0.1:4"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_state(tmp_path, _state(int(dead.stdout), ticks))
    assert read_state(tmp_path) is None and not (tmp_path / "state.json").exists()
    # A live pid that started at another time is a reused pid, not the server that wrote the file.
    write_state(tmp_path, _state(os.getpid(), ticks + 1))
    assert read_state(tmp_path) is None
    (tmp_path / "state.json").write_text("{not json")
    assert read_state(tmp_path) is None and not (tmp_path / "state.json").exists()


def test_one_lock_per_log_dir(tmp_path: Path) -> None:
    first, second = ServeLock(tmp_path), ServeLock(tmp_path)
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()


def test_replicas_get_offset_fixed_ports_or_their_own_free_ones(listener: socket.socket, tmp_path: Path) -> None:
    fixed = resolve_ports(ServeOptions(repository=tmp_path, replicas=3, http_port=28000, grpc_port=28001,
                                       metrics_port=28002, gateway_port=28080))
    assert [(p.http, p.grpc, p.metrics) for p in fixed.triton_ports or []] == [
        (28000, 28001, 28002), (28003, 28004, 28005), (28006, 28007, 28008)]
    assert (fixed.http_port, fixed.grpc_port, fixed.gateway_port) == (28000, 28001, 28080)  # the first replica's
    auto = resolve_ports(ServeOptions(repository=tmp_path, replicas=3, http_port=None, grpc_port=None,
                                      metrics_port=None, gateway_port=None))
    ports = [port for p in auto.triton_ports or [] for port in (p.http, p.grpc, p.metrics)] + [auto.gateway_port]
    assert len(ports) == 10 and len(set(ports)) == 10 and None not in ports
    busy = listener.getsockname()[1]
    with pytest.raises(ServingError, match=rf"port {busy} \(Triton gRPC, replica 2\) .* pid {os.getpid()}"):
        resolve_ports(ServeOptions(repository=tmp_path, replicas=2, grpc_port=busy - 3, http_port=None,
                                   metrics_port=None, gateway_port=None))
    with pytest.raises(ServingError, match="cannot share a port: .*gateway 28006"):
        resolve_ports(ServeOptions(repository=tmp_path, replicas=3, http_port=28000, grpc_port=28001,
                                   metrics_port=28002, gateway_port=28006))
    with pytest.raises(ServingError, match="need ports up to 65537"):
        resolve_ports(ServeOptions(repository=tmp_path, replicas=2, http_port=65532, grpc_port=65533,
                                   metrics_port=65534, gateway_port=None))
    with pytest.raises(ServingError, match="at least 1"):
        resolve_ports(ServeOptions(repository=tmp_path, replicas=0))
