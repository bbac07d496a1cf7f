"""The state file of a running ``toolkit serve`` (``<log-dir>/state.json``), and its lock.

It lists every Triton replica (ports, pid, status, restarts); the top-level ports and ``triton_pid``
are the first replica's, so readers that know one Triton keep working.

``toolkit serve`` holds an exclusive lock on ``<log-dir>/serve.lock`` for its whole life and
writes the state file (atomically) when it starts, when its servers are ready and when Triton is
restarted; a clean exit removes it. Other commands (a second ``toolkit serve``, ``toolkit chat``)
read it to find the running server. A state file whose supervisor is gone is stale: it is
detected by pid plus the process's start time (so a reused pid is not mistaken for it) and removed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from toolkit.files import atomic_write_json

STATE_FILE = "state.json"
LOCK_FILE = "serve.lock"


class ServeStatus(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"


def process_start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if there is no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    if fields[0] == "Z":  # a zombie has exited
        return None
    return int(fields[19])


def process_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """Whether `pid` runs, and (when given) is the process that started at `start_ticks`."""
    if pid is None:
        return False
    ticks = process_start_ticks(pid)
    return ticks is not None and (start_ticks is None or ticks == start_ticks)


@dataclass
class ServeState:
    """What one ``toolkit serve`` runs: its pid, its children's pids, ports, repository and models."""

    pid: int
    pid_start_ticks: int
    repository: str
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    gateway_port: int | None
    log_dir: str
    models: list[str] = field(default_factory=list)
    triton_pid: int | None = None  # the first replica's (the ports above are its ports too)
    gateway_pid: int | None = None
    # Every Triton replica: index, http_port, grpc_port, metrics_port, pid, status, restarts.
    replicas: list[dict[str, Any]] = field(default_factory=list)
    status: ServeStatus = ServeStatus.STARTING
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    @property
    def gateway_url(self) -> str | None:
        if self.gateway_port is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.gateway_port}"

    def alive(self) -> bool:
        return process_alive(self.pid, self.pid_start_ticks)

    def describe(self) -> str:
        """One line: where it serves, its pids and models."""
        where = self.gateway_url or f"Triton gRPC 127.0.0.1:{self.grpc_port} (no gateway)"
        if len(self.replicas) > 1:
            listed = ", ".join(str(r.get("pid")) for r in self.replicas)
            tritons = f"{len(self.replicas)} Triton replicas, pids {listed}"
        else:
            tritons = f"Triton pid {self.triton_pid}"
        pids = f"toolkit serve pid {self.pid}, {tritons}" + (
            f", gateway pid {self.gateway_pid}" if self.gateway_pid else "")
        return (f"{where} ({self.status.value}; {pids}; models: {', '.join(self.models) or '-'}; "
                f"repository {self.repository}; since {self.started_at})")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServeState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["status"] = ServeStatus(known.get("status", ServeStatus.STARTING))
        return cls(**known)


def state_path(log_dir: Path) -> Path:
    return log_dir / STATE_FILE


def write_state(log_dir: Path, state: ServeState) -> None:
    """Replace the state file in one rename, so a reader never sees half of it."""
    atomic_write_json(state_path(log_dir), {**asdict(state), "status": state.status.value})


def remove_state(log_dir: Path) -> None:
    state_path(log_dir).unlink(missing_ok=True)


def read_state(log_dir: Path) -> ServeState | None:
    """The live server's state, or None; a stale or unreadable file is removed."""
    path = state_path(log_dir)
    try:
        state = ServeState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if not state.alive():
        path.unlink(missing_ok=True)
        return None
    return state


class ServeLock:
    """The exclusive lock one ``toolkit serve`` holds on its log dir; released when the process ends."""

    def __init__(self, log_dir: Path) -> None:
        self.path = log_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a")  # noqa: SIM115 - held open for the life of the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        # The file is not opened in a child (close_fds), so only this process holds the lock.
        os.set_inheritable(handle.fileno(), False)
        self._file = handle
        return True

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
