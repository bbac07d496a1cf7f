"""``toolkit serve``: Triton on the model repository plus the gateway, supervised; ``--replicas N`` runs N Tritons.

Before starting, it looks at what already runs: a ``toolkit serve`` holding the log dir's lock
(see :mod:`toolkit.supervisor.state`) is reported (or attached to, with ``reuse``), and a port held by
anything else stops the start with one line naming the port and the process. Ports given as
``auto`` (None here) are picked free. Triton runs with explicit model control (every generation
model found is loaded at start; others can be loaded, unloaded or switched later through its
repository API or the gateway's admin endpoint). Closed by default: Triton binds 127.0.0.1 whatever
``--host`` says (``--host`` is the gateway's address), and its model-control API answers only the
secret header generated for this run, which only the gateway is given
(:mod:`toolkit.supervisor.admin_auth`). With ``--replicas N``, N Tritons run side by side, each on its
own ports (:mod:`toolkit.supervisor.triton_replicas`), and the one gateway spreads requests over all
of them. The gateway is started as ``python -m gateway`` pointed at every replica's gRPC port, so a
bad setting is one line and exit code 2. Readiness is judged on the processes started here: each
must be alive and hold its own port. A Triton that dies is restarted after its own exponential
backoff while the others serve; a gateway that exits is restarted too, unless it exited with code 2
(its configuration is wrong: restarting cannot help). Ctrl-C (or SIGTERM, SIGHUP) stops the gateway
first (a client of Triton), then every Triton, and removes the state file.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from toolkit.errors import ServingError
from toolkit.repository.layout import models_to_load
from toolkit.supervisor.admin_auth import new_admin_key
from toolkit.supervisor.ports import busy_ports, free_ports, owns_port
from toolkit.supervisor.state import ServeLock, ServeState, ServeStatus, read_state, remove_state, write_state
from toolkit.supervisor.triton_replicas import (
    PORT_STRIDE,
    ReplicaStatus,
    TritonPorts,
    TritonReplica,
    gpu_for,
    start_all,
    stop_all,
    visible_gpus,
)
from toolkit.supervisor.triton_server import TritonServer, _die_with_parent

STATE_WAIT_S = 10.0  # how long a second `toolkit serve` waits for a starting one to write its state
TRITON_HOST = "127.0.0.1"  # Triton is reached through the gateway only
GATEWAY_CONFIG_EXIT = 2  # `python -m gateway`: invalid settings or an unservable repository
# A Triton stopped on its own (SIGTERM: a rolling restart) refuses new requests at once and finishes
# the streams it has for up to this long; the gateway sends their successors to the other replicas.
DRAIN_TIMEOUT_S = 30


@dataclass
class ServeOptions:
    """What to serve and where; a port of None is picked free at start (``--port auto``)."""

    repository: Path
    host: str = "127.0.0.1"  # the gateway's address; Triton always binds TRITON_HOST
    http_port: int | None = 8000
    grpc_port: int | None = 8001
    metrics_port: int | None = 8002
    gateway_port: int | None = 8080
    triton_only: bool = False
    log_dir: Path = Path("build/serve")
    ready_timeout_s: float = 300.0
    reuse: bool = False
    replicas: int = 1
    triton_ports: list[TritonPorts] | None = None  # every replica's, once resolved (resolve_ports)


class ServeOutcome(enum.Enum):
    STOPPED = "stopped"  # this process served, and stopped cleanly
    ALREADY_RUNNING = "already-running"  # a toolkit server for this repository runs already


def gateway_available() -> bool:
    return importlib.util.find_spec("gateway") is not None and importlib.util.find_spec("gateway.app") is not None


def resolve_ports(options: ServeOptions) -> ServeOptions:
    """The options with every ``auto`` port picked and every replica's ports set; ServingError naming each
    port something else holds. Replica i's fixed ports are the given ones plus ``PORT_STRIDE * i``."""
    if options.replicas < 1:
        raise ServingError(f"--replicas must be at least 1, not {options.replicas}")
    bases = {"http": options.http_port, "grpc": options.grpc_port, "metrics": options.metrics_port}
    labels = {"http": "Triton HTTP", "grpc": "Triton gRPC", "metrics": "Triton metrics"}
    wanted: list[dict[str, int | None]] = [
        {role: None if base is None else base + PORT_STRIDE * i for role, base in bases.items()}
        for i in range(options.replicas)]

    def label(role: str, i: int) -> str:
        return labels[role] + (f", replica {i + 1}" if options.replicas > 1 else "")

    fixed = [(label(role, i), port) for i, ports in enumerate(wanted) for role, port in ports.items()
             if port is not None]
    if not options.triton_only and options.gateway_port is not None:
        fixed.append(("gateway", options.gateway_port))
    numbers = [port for _, port in fixed]
    if len(set(numbers)) != len(numbers):
        raise ServingError(f"two servers cannot share a port: {', '.join(f'{r} {p}' for r, p in fixed)}")
    if any(port > 65535 for port in numbers):
        raise ServingError(f"{options.replicas} replicas need ports up to {max(numbers)}: choose lower ports or auto")
    busy = busy_ports(TRITON_HOST, [(role, port) for role, port in fixed if role != "gateway"])
    busy += busy_ports(options.host, [(role, port) for role, port in fixed if role == "gateway"])
    if busy:
        raise ServingError("; ".join(busy) + ": stop it, or choose other ports (each port option takes 'auto')")
    auto = sum(port is None for ports in wanted for port in ports.values())
    gateway_auto = not options.triton_only and options.gateway_port is None
    picked = iter(p for p in free_ports(TRITON_HOST, auto + gateway_auto + len(numbers)) if p not in numbers)
    ports = [TritonPorts(**{role: port if port is not None else next(picked) for role, port in ports.items()})
             for ports in wanted]
    resolved = replace(options, http_port=ports[0].http, grpc_port=ports[0].grpc, metrics_port=ports[0].metrics,
                       triton_ports=ports)
    if gateway_auto:
        resolved.gateway_port = next(picked)
    return resolved


class Supervisor:
    """Starts, watches and stops the Triton replicas and the gateway, and keeps the state file current."""

    def __init__(self, options: ServeOptions, say: Callable[[str], None] = print):
        if options.triton_ports is None:
            raise ValueError("resolve 'auto' ports (resolve_ports) before starting")
        self.options = options
        self.say = say
        self.models = models_to_load(options.repository)
        self.admin_key = new_admin_key()  # one per serve: a restarted Triton keeps the gateway's key valid
        options.log_dir.mkdir(parents=True, exist_ok=True)
        self.gpus = visible_gpus() if len(options.triton_ports) > 1 else []
        self.tritons = [TritonReplica(i, ports, self._new_triton, options.ready_timeout_s, say,
                                      self._check_triton_ports) for i, ports in enumerate(options.triton_ports)]
        if len(self.tritons) == 1:
            self.tritons[0].name = "Triton"  # one server: the messages a single-Triton serve always printed
        self.gateway: subprocess.Popen[bytes] | None = None
        first = options.triton_ports[0]
        self.state = ServeState(
            pid=os.getpid(), pid_start_ticks=_own_start_ticks(), repository=str(options.repository.resolve()),
            host=options.host, http_port=first.http, grpc_port=first.grpc, metrics_port=first.metrics,
            gateway_port=None if options.triton_only else options.gateway_port,
            log_dir=str(options.log_dir.resolve()), models=self.models,
        )

    @property
    def triton(self) -> TritonServer:
        """The first replica's server (the only one without --replicas)."""
        return self.tritons[0].server

    def _log_path(self, index: int) -> Path:
        suffix = "" if len(self.options.triton_ports or ()) == 1 else f"-{index + 1}"
        return self.options.log_dir / f"tritonserver{suffix}.log"

    def _new_triton(self, index: int, ports: TritonPorts) -> TritonServer:
        gpu = gpu_for(index, len(self.options.triton_ports or ()), self.gpus)
        return TritonServer(self.options.repository, models=self.models, http_port=ports.http, grpc_port=ports.grpc,
                            metrics_port=ports.metrics, host=TRITON_HOST, log_path=self._log_path(index),
                            admin_key=self.admin_key, exit_timeout_s=DRAIN_TIMEOUT_S,
                            extra_env={} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu})

    def _save(self, **changes: object) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        self.state.replicas = [t.state() for t in self.tritons]
        self.state.triton_pid = self.tritons[0].pid
        write_state(self.options.log_dir, self.state)

    def start(self) -> None:
        self._save(status=ServeStatus.STARTING)
        count = len(self.tritons)
        logs = self._log_path(0) if count == 1 else self.options.log_dir / "tritonserver-N.log"
        self.say(f"starting {'Triton' if count == 1 else f'{count} Triton replicas'} on {self.options.repository} "
                 f"(models: {', '.join(self.models)}); log: {logs}")
        start_all(self.tritons)
        self._save()
        for replica in self.tritons:
            server = replica.server
            name = "Triton" if count == 1 else replica.name
            gpu = server.extra_env.get("CUDA_VISIBLE_DEVICES")
            self.say(f"{name} ready (pid {replica.pid}{f', GPU {gpu}' if gpu else ''}): HTTP http://{server.http_url}  "
                     f"gRPC {server.grpc_url}  metrics {server.metrics_url}")
        if self.options.triton_only and self.options.host != TRITON_HOST:
            self.say(f"note: Triton binds {TRITON_HOST} only (--host is the gateway's address); reach it through "
                     "the gateway, or run Triton yourself where its ports must be open")
        if not self.options.triton_only and not gateway_available():
            self.say("note: the gateway package is not installed; serving Triton only (as --triton-only)")
            self.options.triton_only = True
            self.state.gateway_port = None
        if not self.options.triton_only:
            self._start_gateway()
            self._wait_gateway_ready(self.options.ready_timeout_s)
        self._save(status=ServeStatus.READY)

    def _start_gateway(self) -> None:
        o = self.options
        urls = json.dumps([replica.server.grpc_url for replica in self.tritons])
        env = dict(os.environ, GATEWAY_TRITON_URLS=urls, GATEWAY_REPOSITORY=str(o.repository.resolve()),
                   GATEWAY_HOST=o.host, GATEWAY_PORT=str(o.gateway_port), GATEWAY_TRITON_ADMIN_KEY=self.admin_key,
                   USE_TORCH="0")
        log = open(o.log_dir / "gateway.log", "ab")  # noqa: SIM115 - the child keeps it open
        # `python -m gateway`, not uvicorn's factory: a bad setting is one line and exit code 2, no traceback.
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        log.close()
        self._save(gateway_pid=self.gateway.pid)

    def _wait_gateway_ready(self, timeout_s: float) -> None:
        """The gateway started here holds its port and answers /health/ready; fail at once if it exits."""
        assert self.gateway is not None and self.options.gateway_port is not None
        url = f"{self.state.gateway_url}/health/ready"
        log = self.options.log_dir / "gateway.log"
        deadline = time.monotonic() + timeout_s
        while True:
            if self.gateway.poll() is not None:
                raise ServingError(self._gateway_exit_message("during start-up"))
            if owns_port(self.gateway.pid, self.options.gateway_port) and _http_ok(url):
                break
            if time.monotonic() > deadline:
                raise ServingError(f"the gateway was not ready after {timeout_s:.0f}s; see {log}")
            time.sleep(0.25)
        base = self.state.gateway_url
        self.say(f"gateway ready (pid {self.gateway.pid}): {base}/ (chat page)  {base}/v1/chat/completions  "
                 f"docs {base}/docs; log: {log}")

    def _gateway_exit_message(self, when: str) -> str:
        assert self.gateway is not None
        log = self.options.log_dir / "gateway.log"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        if self.gateway.returncode == GATEWAY_CONFIG_EXIT:
            errors = [line for line in lines if line.startswith("error: ")]
            return f"the gateway refused to start {when}: {errors[-1][7:] if errors else 'see ' + str(log)}"
        tail = "\n".join(lines[-15:])
        return f"the gateway exited with code {self.gateway.returncode} {when}:\n{tail}"

    def _check_ports_still_ours(self, host: str, roles: list[tuple[str, int]]) -> None:
        # A port taken by another program while ours was down: restarting would only fail again.
        busy = busy_ports(host, roles)
        if busy:
            raise ServingError("; ".join(busy) + ": cannot restart; stopping")

    def _check_triton_ports(self, ports: TritonPorts) -> None:
        self._check_ports_still_ours(TRITON_HOST, [("Triton HTTP", ports.http), ("Triton gRPC", ports.grpc)])

    def watch(self, stop_after_s: float | None = None) -> None:
        """Keep every replica and the gateway alive until interrupted (or ``stop_after_s``, for tests).

        The state file says ``ready`` while at least one replica is (the gateway serves from it).
        """
        started = time.monotonic()
        while stop_after_s is None or time.monotonic() - started < stop_after_s:
            time.sleep(0.5)
            if any([replica.tick() for replica in self.tritons]):  # a list: every replica ticks
                serving = any(r.status is ReplicaStatus.READY for r in self.tritons)
                self._save(status=ServeStatus.READY if serving else ServeStatus.STARTING)
            if self.gateway is not None and self.gateway.poll() is not None:
                if self.gateway.returncode == GATEWAY_CONFIG_EXIT:  # a setting is wrong: restarting cannot help
                    raise ServingError(self._gateway_exit_message("after a restart"))
                self.say(f"gateway exited (code {self.gateway.returncode}); restarting it; "
                         f"see {self.options.log_dir / 'gateway.log'}")
                time.sleep(1.0)
                assert self.options.gateway_port is not None
                self._check_ports_still_ours(self.options.host, [("gateway", self.options.gateway_port)])
                self._start_gateway()

    def stop(self) -> None:
        """Gateway first (it holds connections to Triton), then every Triton replica."""
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGINT)
            try:
                self.gateway.wait(15)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait(5)
        self.gateway = None
        stop_all(self.tritons)


def _own_start_ticks() -> int:
    from toolkit.supervisor.state import process_start_ticks

    ticks = process_start_ticks(os.getpid())
    assert ticks is not None
    return ticks


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _running_server(options: ServeOptions, say: Callable[[str], None]) -> ServeOutcome:
    """Another ``toolkit serve`` holds this log dir: report it (and attach with ``reuse``), or fail."""
    deadline = time.monotonic() + STATE_WAIT_S
    state = read_state(options.log_dir)
    while state is None and time.monotonic() < deadline:  # it may be starting and not have written it yet
        time.sleep(0.2)
        state = read_state(options.log_dir)
    if state is None:
        raise ServingError(f"another toolkit serve holds {options.log_dir / 'serve.lock'} but wrote no state; "
                           "stop it or choose another --log-dir")
    if Path(state.repository) != options.repository.resolve():
        raise ServingError(f"a toolkit server for another repository already runs from {options.log_dir}: "
                           f"{state.describe()}; stop it, or choose another --log-dir and ports")
    say(f"already serving {options.repository}: {state.describe()}")
    if not options.reuse:
        return ServeOutcome.ALREADY_RUNNING
    say("attached: waiting while it runs; Ctrl-C detaches and leaves it running")
    try:
        while state.alive():
            time.sleep(0.5)
        say("the attached server stopped")
    except KeyboardInterrupt:
        say("detached; the server keeps running")
    return ServeOutcome.ALREADY_RUNNING


def serve(options: ServeOptions, say: Callable[[str], None] = print) -> ServeOutcome:
    """Serve until Ctrl-C, SIGTERM or SIGHUP (always stopping both children), unless one serves already."""
    lock = ServeLock(options.log_dir)
    if not lock.acquire():
        return _running_server(options, say)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    supervisor: Supervisor | None = None
    try:
        read_state(options.log_dir)  # removes a stale file a killed server left behind
        supervisor = Supervisor(resolve_ports(options), say)
        supervisor.start()
        say("serving; Ctrl-C stops")
        supervisor.watch()
    except KeyboardInterrupt:
        say("stopping")
    finally:
        if supervisor is not None:
            supervisor.stop()
        remove_state(options.log_dir)
        lock.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("stopped")
    return ServeOutcome.STOPPED
