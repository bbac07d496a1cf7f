"""`toolkit serve --triton-only` as a user runs it: URLs printed, Triton restarted when it dies, clean Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.devrepo import ServedRepository
from toolkit.quality.triton_client import GenerationClient

pytestmark = pytest.mark.integration
PORTS = ("18030", "18031", "18032")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_serve_restarts_a_dead_triton_and_stops_cleanly(tiny_repository: ServedRepository, tmp_path: Path) -> None:
    toolkit = Path(sys.executable).parent / "toolkit"
    process = subprocess.Popen(
        [str(toolkit), "serve", "--repository", str(tiny_repository.path), "--triton-only", "--http-port", PORTS[0],
         "--grpc-port", PORTS[1], "--metrics-port", PORTS[2], "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()

    def wait_for(pattern: str, timeout_s: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(lines):
                if match := re.search(pattern, line):
                    return match
            assert process.poll() is None, "".join(lines)
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in:\n{''.join(lines)}")

    try:
        first = int(wait_for(r"Triton ready \(pid (\d+)\)").group(1))
        assert any(f"gRPC 127.0.0.1:{PORTS[1]}" in line for line in lines)
        os.kill(first, signal.SIGKILL)
        wait_for(r"Triton exited")
        second = int(wait_for(r"Triton restarted \(pid (\d+)").group(1))
        with GenerationClient(f"127.0.0.1:{PORTS[1]}", tiny_repository.model) as client:
            result = client.submit([5, 6, 7], max_tokens=4)
            client.wait([result], 60)
        assert result.error is None and len(result.tokens) <= 4 and result.finish_reason
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        wait_for("stopped")
        assert not _alive(second), "tritonserver outlived `toolkit serve`"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
