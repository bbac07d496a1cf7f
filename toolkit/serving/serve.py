"""``toolkit serve``: Triton on the model repository plus the gateway, supervised.

Before starting, it looks at what already runs: a ``toolkit serve`` holding the log dir's lock
(see :mod:`toolkit.serving.state`) is reported (or attached to, with ``reuse``), and a port held by
anything else stops the start with one line naming the port and the process. Ports given as
``auto`` (None here) are picked free. Triton runs with explicit model control (every generation
model found is loaded at start; others can be loaded, unloaded or switched later through its
repository API or the gateway's admin endpoint). Closed by default: Triton binds 127.0.0.1 whatever
``--host`` says (``--host`` is the gateway's address), and its model-control API answers only the
secret header generated for this run, which only the gateway is given
(:mod:`toolkit.serving.admin_auth`). The gateway is started as ``python -m gateway`` pointed at
Triton's gRPC port, so a bad setting is one line and exit code 2. Readiness is judged on the
processes started here: each must be alive and hold its own port. If Triton dies it is restarted
with exponential backoff; a gateway that exits is restarted too, unless it exited with code 2 (its
configuration is wrong: restarting cannot help). Ctrl-C (or SIGTERM, SIGHUP) stops the gateway
first (a client of Triton), then Triton, and removes the state file.
"""

from __future__ import annotations

import enum
import importlib.util
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
from toolkit.serving.admin_auth import new_admin_key
from toolkit.serving.ports import busy_ports, free_ports, owns_port
from toolkit.serving.state import ServeLock, ServeState, ServeStatus, read_state, remove_state, write_state
from toolkit.serving.triton_server import TritonServer, _die_with_parent

MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a server that stayed up this long resets the backoff


STATE_WAIT_S = 10.0  # how long a second `toolkit serve` waits for a starting one to write its state
TRITON_HOST = "127.0.0.1"  # Triton is reached through the gateway only
GATEWAY_CONFIG_EXIT = 2  # `python -m gateway`: invalid settings or an unservable repository


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


class ServeOutcome(enum.Enum):
    STOPPED = "stopped"  # this process served, and stopped cleanly
    ALREADY_RUNNING = "already-running"  # a toolkit server for this repository runs already


def gateway_available() -> bool:
    return importlib.util.find_spec("gateway") is not None and importlib.util.find_spec("gateway.app") is not None


def resolve_ports(options: ServeOptions) -> ServeOptions:
    """The options with every ``auto`` port picked; ServingError naming each port something else holds."""
    roles = [("http_port", "Triton HTTP"), ("grpc_port", "Triton gRPC"), ("metrics_port", "Triton metrics")]
    if not options.triton_only:
        roles.append(("gateway_port", "gateway"))
    fixed = [(label, getattr(options, name)) for name, label in roles if getattr(options, name) is not None]
    numbers = [port for _, port in fixed]
    if len(set(numbers)) != len(numbers):
        raise ServingError(f"two servers cannot share a port: {', '.join(f'{r} {p}' for r, p in fixed)}")
    busy = busy_ports(TRITON_HOST, [(label, port) for label, port in fixed if label != "gateway"])
    busy += busy_ports(options.host, [(label, port) for label, port in fixed if label == "gateway"])
    if busy:
        raise ServingError("; ".join(busy) + ": stop it, or choose other ports (each port option takes 'auto')")
    auto = [name for name, _ in roles if getattr(options, name) is None]
    picked = [p for p in free_ports(TRITON_HOST, len(auto) + len(numbers)) if p not in numbers]
    resolved = replace(options)
    for name, port in zip(auto, picked, strict=False):
        setattr(resolved, name, port)
    return resolved


class Supervisor:
    """Starts, watches and stops Triton and the gateway, and keeps the state file current."""

    def __init__(self, options: ServeOptions, say: Callable[[str], None] = print):
        if None in (options.http_port, options.grpc_port, options.metrics_port):
            raise ValueError("resolve 'auto' ports (resolve_ports) before starting")
        self.options = options
        self.say = say
        self.models = models_to_load(options.repository)
        self.admin_key = new_admin_key()  # one per serve: a restarted Triton keeps the gateway's key valid
        options.log_dir.mkdir(parents=True, exist_ok=True)
        self.triton = self._new_triton()
        self.gateway: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.state = ServeState(
            pid=os.getpid(), pid_start_ticks=_own_start_ticks(), repository=str(options.repository.resolve()),
            host=options.host, http_port=self.triton.http_port, grpc_port=self.triton.grpc_port,
            metrics_port=self.triton.metrics_port, gateway_port=None if options.triton_only else options.gateway_port,
            log_dir=str(options.log_dir.resolve()), models=self.models,
        )

    def _new_triton(self) -> TritonServer:
        o = self.options
        assert o.http_port is not None and o.grpc_port is not None and o.metrics_port is not None
        return TritonServer(o.repository, models=self.models, http_port=o.http_port, grpc_port=o.grpc_port,
                            metrics_port=o.metrics_port, host=TRITON_HOST, log_path=o.log_dir / "tritonserver.log",
                            admin_key=self.admin_key)

    def _save(self, **changes: object) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        write_state(self.options.log_dir, self.state)

    def start(self) -> None:
        self._save(status=ServeStatus.STARTING)
        self.say(f"starting Triton on {self.options.repository} (models: {', '.join(self.models)}); "
                 f"log: {self.options.log_dir / 'tritonserver.log'}")
        self.triton.start(self.options.ready_timeout_s)
        pid = self.triton.process.pid if self.triton.process else None
        self._save(triton_pid=pid)
        self.say(f"Triton ready (pid {pid}): HTTP http://{self.triton.http_url}  gRPC {self.triton.grpc_url}  "
                 f"metrics {self.triton.metrics_url}")
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
        env = dict(os.environ, GATEWAY_TRITON_URLS=self.triton.grpc_url, GATEWAY_REPOSITORY=str(o.repository.resolve()),
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

    def watch(self, stop_after_s: float | None = None) -> None:
        """Keep both alive until interrupted (or ``stop_after_s``, for tests)."""
        started = time.monotonic()
        up_since = time.monotonic()
        backoff = 1.0
        while stop_after_s is None or time.monotonic() - started < stop_after_s:
            time.sleep(0.5)
            if not self.triton.is_alive():
                code = self.triton.process.returncode if self.triton.process else None
                self.say(f"Triton exited (code {code}); restarting in {backoff:.0f}s. Last log lines:\n"
                         f"{self.triton.log_tail(10)}")
                self.triton.stop()
                self._save(status=ServeStatus.STARTING, triton_pid=None)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                self._check_ports_still_ours(TRITON_HOST, [("Triton HTTP", self.triton.http_port),
                                              ("Triton gRPC", self.triton.grpc_port)])
                self.triton = self._new_triton()
                try:
                    self.triton.start(self.options.ready_timeout_s)
                except ServingError as err:
                    self.say(f"Triton restart failed: {err}")
                    continue
                self.restarts += 1
                up_since = time.monotonic()
                pid = self.triton.process.pid if self.triton.process else None
                self._save(status=ServeStatus.READY, triton_pid=pid)
                self.say(f"Triton restarted (pid {pid}, restart #{self.restarts})")
            elif time.monotonic() - up_since > STABLE_AFTER_S:
                backoff = 1.0
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
        """Gateway first (it holds connections to Triton), then Triton."""
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGINT)
            try:
                self.gateway.wait(15)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait(5)
        self.gateway = None
        self.triton.stop()


def _own_start_ticks() -> int:
    from toolkit.serving.state import process_start_ticks

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
