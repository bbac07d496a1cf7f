"""``toolkit serve``: Triton on the model repository plus the gateway, supervised.

Triton runs with explicit model control (every generation model found is loaded at start; others can
be loaded, unloaded or switched later through its repository API or the gateway's admin endpoint).
The gateway is started as ``uvicorn gateway.app:create_app --factory`` pointed at Triton's gRPC port.
If Triton dies it is restarted with exponential backoff, and the supervisor says so; Ctrl-C (or
SIGTERM) stops the gateway first (a client of Triton), then Triton.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ServingError
from toolkit.repository.layout import models_to_load
from toolkit.serving.triton_server import TritonServer, _die_with_parent

MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a server that stayed up this long resets the backoff


@dataclass
class ServeOptions:
    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    gateway_port: int = 8080
    triton_only: bool = False
    log_dir: Path = Path("build/serve")
    ready_timeout_s: float = 300.0


def gateway_available() -> bool:
    return importlib.util.find_spec("gateway") is not None and importlib.util.find_spec("gateway.app") is not None


class Supervisor:
    """Starts, watches and stops Triton and the gateway."""

    def __init__(self, options: ServeOptions, say: Callable[[str], None] = print):
        self.options = options
        self.say = say
        self.models = models_to_load(options.repository)
        options.log_dir.mkdir(parents=True, exist_ok=True)
        self.triton = self._new_triton()
        self.gateway: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def _new_triton(self) -> TritonServer:
        o = self.options
        return TritonServer(o.repository, models=self.models, http_port=o.http_port, grpc_port=o.grpc_port,
                            metrics_port=o.metrics_port, host=o.host, log_path=o.log_dir / "tritonserver.log")

    def start(self) -> None:
        self.say(f"starting Triton on {self.options.repository} (models: {', '.join(self.models)}); "
                 f"log: {self.options.log_dir / 'tritonserver.log'}")
        self.triton.start(self.options.ready_timeout_s)
        pid = self.triton.process.pid if self.triton.process else None
        self.say(f"Triton ready (pid {pid}): HTTP http://{self.triton.http_url}  gRPC {self.triton.grpc_url}  "
                 f"metrics {self.triton.metrics_url}")
        if self.options.triton_only:
            return
        if not gateway_available():
            self.say("note: the gateway package is not installed; serving Triton only (as --triton-only)")
            self.options.triton_only = True
            return
        self._start_gateway()

    def _start_gateway(self) -> None:
        o = self.options
        env = dict(os.environ, GATEWAY_TRITON_URLS=self.triton.grpc_url, GATEWAY_REPOSITORY=str(o.repository.resolve()),
                   GATEWAY_HOST=o.host, GATEWAY_PORT=str(o.gateway_port), USE_TORCH="0")
        log = open(o.log_dir / "gateway.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "gateway.app:create_app", "--factory", "--host", o.host,
             "--port", str(o.gateway_port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        log.close()
        self.say(f"gateway (pid {self.gateway.pid}): http://{o.host}:{o.gateway_port}/v1/chat/completions  "
                 f"docs http://{o.host}:{o.gateway_port}/docs; log: {o.log_dir / 'gateway.log'}")

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
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                self.triton = self._new_triton()
                try:
                    self.triton.start(self.options.ready_timeout_s)
                except ServingError as err:
                    self.say(f"Triton restart failed: {err}")
                    continue
                self.restarts += 1
                up_since = time.monotonic()
                pid = self.triton.process.pid if self.triton.process else None
                self.say(f"Triton restarted (pid {pid}, restart #{self.restarts})")
            elif time.monotonic() - up_since > STABLE_AFTER_S:
                backoff = 1.0
            if self.gateway is not None and self.gateway.poll() is not None:
                self.say(f"gateway exited (code {self.gateway.returncode}); restarting it; "
                         f"see {self.options.log_dir / 'gateway.log'}")
                time.sleep(1.0)
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


def serve(options: ServeOptions, say: Callable[[str], None] = print) -> None:
    """Run until Ctrl-C or SIGTERM; always stops both children."""
    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    supervisor = Supervisor(options, say)
    try:
        supervisor.start()
        say("serving; Ctrl-C stops")
        supervisor.watch()
    except KeyboardInterrupt:
        say("stopping")
    finally:
        supervisor.stop()
        signal.signal(signal.SIGTERM, previous)
        say("stopped")
