"""The one launcher of a real Triton server: the ``tritonserver`` 2.51 binary in the nvidia-pytriton wheel.

No container. Only the python backend is bundled; its three files are symlinked (not copied, or
their RPATHs stop resolving) into a private backend directory. The backend stub runs Python in
isolated mode and takes its environment from the first ``python3`` on PATH, so the running
virtualenv's ``bin`` goes first (PYTHONPATH would be ignored). The server is a child that dies
with its parent, binds 127.0.0.1 by default, logs to a file, and is stopped with SIGINT, a timed
wait, then SIGKILL. Its model-control API (and the other protocols in
:data:`toolkit.supervisor.admin_auth.RESTRICTED_PROTOCOLS`) answers only callers that send the
run's ``admin_key`` (generated unless given).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.errors import ServingError
from toolkit.supervisor.admin_auth import new_admin_key, restricted_flags
from toolkit.supervisor.ports import owns_port

PR_SET_PDEATHSIG = 1
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


def pytriton_dist() -> Path:
    """The ``tritonserver`` directory shipped inside the nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError:
        raise ServingError("nvidia-pytriton is not installed; run `make venv` (it ships the Triton server)") from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise ServingError(f"no tritonserver binary under {dist}; reinstall nvidia-pytriton==0.7.0")
    return dist


def prepare_backend_dir(root: Path, dist: Path | None = None) -> Path:
    """Symlink the python backend and the stub for this interpreter into ``root/python``; return ``root``."""
    dist = dist or pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServingError(f"the Triton python backend has no stub for Python {version} ({stub} is missing)")
    python_dir = root / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    sources = [dist / "backends" / "python" / name for name in _PYTHON_BACKEND_FILES] + [stub]
    for source in sources:
        link = python_dir / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return root


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the parent dies, the kernel sends SIGTERM.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class TritonServer:
    """A tritonserver child process on one model repository, with explicit model control."""

    repository: Path
    models: Sequence[str] = ()
    http_port: int = 18000
    grpc_port: int = 18001
    metrics_port: int = 18002
    host: str = "127.0.0.1"
    log_path: Path | None = None
    exit_timeout_s: int = 3
    extra_args: Sequence[str] = ()
    verbose_log: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)  # set in the server's environment (e.g. its GPU)
    admin_key: str = field(default_factory=new_admin_key, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)
    _interrupted: bool = field(default=False, init=False, repr=False)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path) -> list[str]:
        """The exact tritonserver command line (logged, and printed by ``toolkit serve``)."""
        binary = pytriton_dist() / "bin" / "tritonserver"
        args = [
            str(binary),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--strict-readiness=true",
            # Pings from the gateway's keepalive (every 30 s) must never count as abuse (default: one per 5 min).
            "--grpc-http2-min-recv-ping-interval-without-data=10000",
            *restricted_flags(self.admin_key),
        ]
        if self.log_path is not None:
            args.append(f"--log-file={self.log_path}")
        if self.verbose_log:
            args.append("--log-verbose=1")
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The python backend stub finds its interpreter (and so numpy<2 and the toolkit) as `python3` on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.extra_env)
        return env

    def start(self, ready_timeout_s: float = 120.0) -> TritonServer:
        """Start the server and wait until it and every model in ``models`` are ready."""
        self.launch()
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        """Start the process and return at once (:meth:`ready_now` or :meth:`wait_ready` tell when it serves)."""
        if not self.repository.is_dir():
            raise ServingError(f"model repository {self.repository} does not exist; run `toolkit build` first")
        self._tmp = tempfile.TemporaryDirectory(prefix="triton-backends-")
        backend_dir = prepare_backend_dir(Path(self._tmp.name))
        if self.log_path is None:
            self.log_path = Path(self._tmp.name) / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(backend_dir), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            )

    def ready_now(self) -> bool:
        """Whether this child and every model in ``models`` are ready; ServingError (with the log tail) if it exited."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise ServingError(f"tritonserver exited with code {code} during start-up:\n{self.log_tail()}")
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in self.models)]
        # Ready only when the process started here holds the port: a probe answered by another
        # server on the same port (a second `toolkit serve`) must not count.
        return all(self._http_ok(p) for p in paths) and owns_port(self.process.pid, self.http_port)

    def wait_ready(self, timeout_s: float) -> None:
        """Poll readiness of this child against a deadline; fail at once (with the log tail) if it exits."""
        deadline = time.monotonic() + timeout_s
        while not self.ready_now():
            if time.monotonic() > deadline:
                raise ServingError(f"tritonserver was not ready after {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.25)

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_ready(self) -> bool:
        return self.is_alive() and self._http_ok("/v2/health/ready")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGINT, a timed wait, then SIGKILL. Close clients first, or Triton waits out its exit timeout."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                if not self._interrupted:
                    process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            code = process.returncode
        self._interrupted = False
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def interrupt(self) -> None:
        """Send the clean-shutdown signal now and return; :meth:`stop` then waits (several servers stop together)."""
        if self.process is not None and self.process.poll() is None and not self._interrupted:
            self.process.send_signal(signal.SIGINT)
            self._interrupted = True

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
