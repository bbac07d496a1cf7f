"""The Triton replicas of one ``toolkit serve``: their ports, and each one's restart with its own backoff.

``toolkit serve --replicas N`` runs N tritonserver processes on the same repository, each on its own
three ports: fixed ports are offset by :data:`PORT_STRIDE` per replica (8000-8002, 8003-8005, ...),
``auto`` ports are picked free for each. Every replica is watched on its own: one that exits is
restarted after its own exponential backoff (1 s doubling to 30 s, back to 1 s once it stayed up a
minute) while the others keep serving, and :meth:`TritonReplica.tick` never blocks, so a replica
that takes a minute to start does not delay noticing that another died. On a host with several GPUs,
each replica sees one of them (``CUDA_VISIBLE_DEVICES``, round robin over the visible ones), so N
replicas on N GPUs are N independent servers instead of N servers each spread over every GPU. On a
CPU host every replica's onnxruntime uses every core, as one replica's does (measured on 2 cores:
better at concurrency 1 and 32 than giving each its share; docs/scaling.md); ``OMP_NUM_THREADS``, set
by the user, applies to each.
"""

from __future__ import annotations

import enum
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from toolkit.errors import ServingError
from toolkit.supervisor.triton_server import TritonServer

PORT_STRIDE = 3  # replica i's fixed ports are the first replica's plus 3 * i
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a replica that stayed up this long restarts after the shortest backoff again
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TritonPorts:
    """One replica's ports."""

    http: int
    grpc: int
    metrics: int


class ReplicaStatus(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    WAITING = "waiting"  # exited; restarting after its backoff


class TritonReplica:
    """One supervised tritonserver: started, watched, restarted after its backoff when it exits."""

    def __init__(self, index: int, ports: TritonPorts, new_server: Callable[[int, TritonPorts], TritonServer],
                 ready_timeout_s: float, say: Callable[[str], None],
                 check_ports: Callable[[TritonPorts], None]) -> None:
        self.index, self.ports, self._new_server = index, ports, new_server
        self.ready_timeout_s, self.say, self._check_ports = ready_timeout_s, say, check_ports
        self.server = new_server(index, ports)
        self.status = ReplicaStatus.STARTING
        self.restarts = 0
        self.backoff_s = 1.0
        self._up_since = self._restart_at = self._deadline = 0.0
        self.name = f"Triton replica {index + 1}"

    @property
    def pid(self) -> int | None:
        process = self.server.process
        return process.pid if process is not None and self.status is not ReplicaStatus.WAITING else None

    def launch(self) -> None:
        self.server.launch()
        self.status, self._deadline = ReplicaStatus.STARTING, time.monotonic() + self.ready_timeout_s

    def wait_ready(self) -> None:
        """Block until this (just launched) replica is ready: start-up, where every replica must come up."""
        self.server.wait_ready(max(0.0, self._deadline - time.monotonic()))
        self.status, self._up_since = ReplicaStatus.READY, time.monotonic()

    def tick(self) -> bool:
        """One supervision step (never blocks on the replica); True when its status or pid changed."""
        now = time.monotonic()
        if self.status is ReplicaStatus.READY:
            if self.server.is_alive():
                if now - self._up_since > STABLE_AFTER_S:
                    self.backoff_s = 1.0
                return False
            code = self.server.process.returncode if self.server.process else None
            self._wait(f"{self.name} exited (code {code})", self.server.log_tail(10))
            return True
        if self.status is ReplicaStatus.WAITING:
            if now < self._restart_at:
                return False
            self._check_ports(self.ports)
            self.server = self._new_server(self.index, self.ports)
            self.launch()
            return True
        try:
            ready = self.server.ready_now()
        except ServingError as err:
            self._wait(f"{self.name} restart failed", str(err))
            return True
        if ready:
            self.restarts += 1
            self.status, self._up_since = ReplicaStatus.READY, now
            self.say(f"{self.name} restarted (pid {self.pid}, restart #{self.restarts})")
            return True
        if now > self._deadline:
            self._wait(f"{self.name} was not ready after {self.ready_timeout_s:.0f}s", self.server.log_tail(10))
            return True
        return False

    def _wait(self, what: str, details: str) -> None:
        self.say(f"{what}; restarting in {self.backoff_s:.0f}s. Last log lines:\n{details}")
        self.server.stop()
        self.status, self._restart_at = ReplicaStatus.WAITING, time.monotonic() + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)

    def state(self) -> dict[str, object]:
        """This replica as the state file lists it."""
        return {"index": self.index, "http_port": self.ports.http, "grpc_port": self.ports.grpc,
                "metrics_port": self.ports.metrics, "pid": self.pid, "status": self.status.value,
                "restarts": self.restarts}


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs replicas may use: ``CUDA_VISIBLE_DEVICES`` when set (empty or -1: none), else nvidia-smi's list."""
    environ = dict(os.environ) if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        listed = [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        return [] if listed in ([], ["-1"]) else listed
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_for(index: int, replicas: int, gpus: Sequence[str]) -> str | None:
    """The GPU replica `index` of `replicas` gets: round robin; None with one replica or no GPU (see them all)."""
    if replicas == 1 or not gpus:
        return None
    return gpus[index % len(gpus)]


def start_all(replicas: Sequence[TritonReplica]) -> None:
    """Launch every replica, then wait for each (they load their models side by side)."""
    for replica in replicas:
        replica.launch()
    for replica in replicas:
        replica.wait_ready()


def stop_all(replicas: Sequence[TritonReplica]) -> None:
    """Signal every replica first, then wait for each: N replicas stop in the time of one."""
    for replica in replicas:
        replica.server.interrupt()
    for replica in replicas:
        replica.server.stop(STOP_TIMEOUT_S)
