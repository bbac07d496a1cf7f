"""`toolkit serve --replicas`: each Triton replica restarted after its own backoff, never blocking the others.

A scripted stand-in for the tritonserver process and a clock the test moves; the real processes run in
tests/integration/test_replicas.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from toolkit.errors import ServingError
from toolkit.supervisor import triton_replicas
from toolkit.supervisor.triton_replicas import ReplicaStatus, TritonPorts, TritonReplica

PIDS = itertools.count(100)


class Process:
    def __init__(self) -> None:
        self.pid = next(PIDS)
        self.returncode: int | None = None


class FakeServer:
    """What the supervisor uses of TritonServer: launch, readiness, liveness, stop."""

    def __init__(self, ready_after: int = 1, fails_start: bool = False) -> None:
        self.process: Process | None = None
        self.ready_after, self.fails_start, self.polls, self.stopped = ready_after, fails_start, 0, False

    def launch(self) -> None:
        self.process = Process()

    def ready_now(self) -> bool:
        self.polls += 1
        if self.fails_start:
            raise ServingError("tritonserver exited with code 1 during start-up")
        return self.polls >= self.ready_after

    def wait_ready(self, timeout_s: float) -> None:
        assert self.ready_now()

    def is_alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def die(self) -> None:
        assert self.process is not None
        self.process.returncode = -9

    def stop(self, timeout_s: float = 15.0) -> None:
        self.stopped = True

    def log_tail(self, lines: int = 40) -> str:
        return "(log)"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(triton_replicas.time, "monotonic", clock)
    return clock


def _replica(index: int, servers: list[FakeServer], said: list[str], checked: list[TritonPorts]) -> TritonReplica:
    made = iter(servers)

    def new_server(i: int, ports: TritonPorts) -> FakeServer:
        assert i == index
        return next(made)

    replica = TritonReplica(index, TritonPorts(1, 2, 3), new_server, ready_timeout_s=60, say=said.append,  # type: ignore[arg-type]
                            check_ports=checked.append)
    triton_replicas.start_all([replica])
    return replica


def test_a_dead_replica_is_restarted_after_its_backoff_which_doubles_and_resets(clock: Clock) -> None:
    said: list[str] = []
    checked: list[TritonPorts] = []
    first, second, third, fourth = FakeServer(), FakeServer(ready_after=2), FakeServer(fails_start=True), FakeServer()
    replica = _replica(0, [first, second, third, fourth], said, checked)
    assert replica.status is ReplicaStatus.READY and replica.pid == first.process.pid  # type: ignore[union-attr]

    first.die()
    assert replica.tick() and replica.status is ReplicaStatus.WAITING and first.stopped and replica.pid is None
    assert "Triton replica 1 exited (code -9); restarting in 1s" in said[-1]
    clock.now += 0.9
    assert not replica.tick()  # still waiting out its 1 s
    clock.now += 0.2
    assert replica.tick() and replica.status is ReplicaStatus.STARTING and checked == [TritonPorts(1, 2, 3)]
    assert not replica.tick()  # loading: not ready on the first poll
    assert replica.tick() and replica.status is ReplicaStatus.READY and replica.restarts == 1
    assert second.process is not None
    assert said[-1] == f"Triton replica 1 restarted (pid {second.process.pid}, restart #1)"

    second.die()  # died again at once: the next wait is twice as long
    replica.tick()
    assert "restarting in 2s" in said[-1]
    clock.now += 2.1
    replica.tick()
    assert replica.tick() and replica.status is ReplicaStatus.WAITING and "restart failed" in said[-1]
    assert "restarting in 4s" in said[-1]
    clock.now += 4.1
    replica.tick()
    replica.tick()
    assert replica.status is ReplicaStatus.READY and replica.restarts == 2
    clock.now += 61  # up for a minute: the backoff is back to 1 s
    replica.tick()
    fourth.die()
    replica.tick()
    assert "restarting in 1s" in said[-1]


def test_replicas_are_watched_apart(clock: Clock) -> None:
    said: list[str] = []
    servers = [[FakeServer(), FakeServer()], [FakeServer()]]
    replicas = [_replica(i, s, said, []) for i, s in enumerate(servers)]
    servers[0][0].die()
    assert [r.tick() for r in replicas] == [True, False]
    assert [r.status for r in replicas] == [ReplicaStatus.WAITING, ReplicaStatus.READY]
    assert [r.state()["status"] for r in replicas] == ["waiting", "ready"]
    assert replicas[1].state() == {"index": 1, "http_port": 1, "grpc_port": 2, "metrics_port": 3,
                                   "pid": servers[1][0].process.pid, "status": "ready", "restarts": 0}  # type: ignore[union-attr]


def test_a_replica_not_ready_in_time_is_stopped_and_retried(clock: Clock, tmp_path: Path) -> None:
    said: list[str] = []
    slow = FakeServer(ready_after=10**6)
    replica = _replica(0, [FakeServer(), slow, FakeServer()], said, [])
    replica.server.die()  # type: ignore[attr-defined]
    replica.tick()
    clock.now += 1.1
    replica.tick()
    clock.now += 61
    assert replica.tick() and slow.stopped and "was not ready after 60s" in said[-1]


@pytest.mark.parametrize(("environ", "expected"), [
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, ["0", "1", "2", "3"]),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5f1c, GPU-77aa"}, ["GPU-5f1c", "GPU-77aa"]),
    ({"CUDA_VISIBLE_DEVICES": ""}, []),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
])
def test_the_gpus_replicas_may_use(environ: dict[str, str], expected: list[str]) -> None:
    assert triton_replicas.visible_gpus(environ) == expected


def test_each_replica_gets_one_gpu_round_robin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit.supervisor.serve import ServeOptions, Supervisor

    assert [triton_replicas.gpu_for(i, 3, ["0", "1"]) for i in range(3)] == ["0", "1", "0"]
    assert triton_replicas.gpu_for(0, 1, ["0", "1"]) is None  # one replica: every GPU, as before
    assert triton_replicas.gpu_for(1, 2, []) is None  # no GPU: nothing to choose
    (tmp_path / "chat" / "1").mkdir(parents=True)
    (tmp_path / "chat" / "config.pbtxt").write_text('name: "chat"\nbackend: "python"\n')
    for file in ("model.py", "manifest.json"):
        (tmp_path / "chat" / "1" / file).write_text("")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    ports = [TritonPorts(8000 + 3 * i, 8001 + 3 * i, 8002 + 3 * i) for i in range(2)]
    supervisor = Supervisor(ServeOptions(repository=tmp_path, log_dir=tmp_path / "logs", replicas=2,
                                         triton_ports=ports), say=lambda _: None)
    assert [t.server.environment()["CUDA_VISIBLE_DEVICES"] for t in supervisor.tritons] == ["2", "3"]

    assert [t.server.log_path.name for t in supervisor.tritons] == ["tritonserver-1.log", "tritonserver-2.log"]  # type: ignore[union-attr]
