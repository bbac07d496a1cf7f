"""Find the gateway ``toolkit chat`` talks to: ``--url``, a running ``toolkit serve``, or one started here.

A running server is found through its state file (``<log-dir>/state.json``) and left running.
With nothing running, ``toolkit serve`` is started in the background on the repository (the
latest build by default) with every port ``auto``, in its own session so the chat's Ctrl-C does not
reach it, and dying with the chat if the chat is killed. :meth:`Backend.stop` stops only what was
started here: SIGTERM to ``toolkit serve`` (which stops the gateway, then Triton), then SIGKILL to
its whole process group if it has not finished in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toolkit.supervisor.state import ServeState, ServeStatus, read_state
from toolkit.supervisor.triton_server import _die_with_parent
from toolkit.terminal_chat.gateway_client import ChatError

SERVE_LOG = "serve.log"
STOP_TIMEOUT_S = 45.0  # toolkit serve gives the gateway and Triton 15 s each


@dataclass
class Backend:
    """The gateway to use, and the ``toolkit serve`` process started for it (None: not ours to stop)."""

    url: str
    started: subprocess.Popen[bytes] | None = None
    state: ServeState | None = None

    def stop(self, say: Callable[[str], None]) -> None:
        """Stop the server this chat started (nothing otherwise); waits for it, then kills what is left."""
        process, self.started = self.started, None
        if process is None or process.poll() is not None:
            return
        say(f"stopping the server this chat started (toolkit serve pid {process.pid})")
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def _wait_ready(log_dir: Path, process: subprocess.Popen[bytes] | None, timeout_s: float,
                progress: Callable[[str], None]) -> ServeState:
    """Poll the state file until the server is ready; relay new ``serve.log`` lines as progress."""
    log = log_dir / SERVE_LOG
    seen = log.stat().st_size if log.is_file() else 0
    deadline = time.monotonic() + timeout_s
    while True:
        if log.is_file():
            with log.open("rb") as fh:
                fh.seek(seen)
                chunk = fh.read()
            seen += len(chunk)
            for line in chunk.decode(errors="replace").splitlines():
                if line.strip():
                    progress(line.strip())
        state = read_state(log_dir)
        if state is not None and state.status == ServeStatus.READY:
            return state
        if process is None and state is None:  # the server that was starting stopped (it removes its state)
            raise ChatError(f"the server that was starting has stopped; see {log}")
        if process is not None and process.poll() is not None and state is None:
            lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
            reason = next((x for x in reversed(lines) if "error" in x.lower()), lines[-1] if lines else "no output")
            raise ChatError(f"toolkit serve exited with code {process.returncode}: {reason.strip()}")
        if time.monotonic() > deadline:
            raise ChatError(f"the server was not ready after {timeout_s:.0f}s; see {log}")
        time.sleep(0.25)


def serve_command(repository: Path, log_dir: Path, host: str) -> list[str]:
    """``toolkit serve`` on `repository` with every port picked free."""
    return [sys.executable, "-m", "toolkit", "serve", "--repository", str(repository), "--log-dir", str(log_dir),
            "--host", host, "--port", "auto", "--http-port", "auto", "--grpc-port", "auto",
            "--metrics-port", "auto"]


def connect(url: str | None, repository: Path, log_dir: Path, *, host: str = "127.0.0.1",
            ready_timeout_s: float = 300.0, say: Callable[[str], None] = print,
            progress: Callable[[str], None] = print) -> Backend:
    """The gateway at `url`; else the running server's; else a ``toolkit serve`` started here."""
    if url:
        return Backend(url)
    state = read_state(log_dir)
    if state is not None:
        if state.gateway_url is None:
            raise ChatError(f"the running server has no gateway (toolkit serve --triton-only): {state.describe()}")
        if state.status != ServeStatus.READY:
            say(f"waiting for the server that is starting (toolkit serve pid {state.pid})")
            state = _wait_ready(log_dir, None, ready_timeout_s, progress)
        say(f"using the running server: {state.describe()}")
        return Backend(str(state.gateway_url), None, state)
    log_dir.mkdir(parents=True, exist_ok=True)
    say(f"no server running; starting toolkit serve on {repository} (log: {log_dir / SERVE_LOG})")
    with (log_dir / SERVE_LOG).open("ab") as log:
        process = subprocess.Popen(
            serve_command(repository, log_dir, host), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
            env={**os.environ, "COLUMNS": "200"},  # one log line per message, not wrapped at 80
        )
    backend = Backend("", process)
    try:
        state = _wait_ready(log_dir, process, ready_timeout_s, progress)
    except BaseException:
        backend.stop(say)
        raise
    if process.poll() is not None:  # another chat's server won the race: use it, it is not ours
        backend.started = None
    backend.url, backend.state = str(state.gateway_url), state
    return backend
