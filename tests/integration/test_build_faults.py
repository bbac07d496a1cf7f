"""`toolkit build` under faults, as a user meets them: SIGKILL, a full disk, a failed gate, Ctrl-C.

Every build is the real command in a subprocess on the tiny model (tests/tinybuild.py: every stage in
about 20 s). After each fault the test looks at what a user would: the exit code, the lines printed,
``report.json``, and the workspace and repository checked file by file against the hashes the build
recorded. The long version (20 kill points) is ``benchmarks/reliability.py --build-kills 20``.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tinybuild import (
    ROOT,
    kill_build_within,
    run_build,
    start_build,
    timed,
    tiny_base_model,
    tiny_config,
    verify_build,
)

pytestmark = pytest.mark.integration

KILLS = 3  # the suite's share of the 20 kill points of the long version
SEED = 13
FILE_LIMIT_BYTES = 400 * 1024  # below the tiny model.onnx (~730 KiB), above every other file of the export


@dataclass
class TinyBuild:
    root: Path
    base: Path
    config: Path
    workspace: Path
    repository: Path
    full_build_s: float

    def variant(self, name: str, **sections: dict[str, object]) -> Path:
        """The same build with some settings changed (same workspace and repository)."""
        return tiny_config(self.root / f"{name}.yaml", self.base, self.workspace, self.repository, **sections)


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyBuild:
    root = tmp_path_factory.mktemp("tinybuild")
    base = tiny_base_model(root / "base")
    workspace, repository = root / "ws", root / "repo"
    config = tiny_config(root / "tiny.yaml", base, workspace, repository)
    result, seconds = timed(run_build, config)
    assert result.returncode == 0, result.stdout[-3000:]
    print(f"figures: a full build of the tiny model took {seconds:.1f} s")
    return TinyBuild(root, base, config, workspace, repository, seconds)


def _whole(tiny: TinyBuild) -> None:
    """The build as a user would find it after `toolkit build`: passed, and every file as recorded."""
    result = run_build(tiny.config)
    assert result.returncode == 0, result.stdout[-3000:]
    verified = verify_build(tiny.workspace, tiny.repository)
    assert not verified.problems, verified.problems


def test_a_build_killed_at_random_points_reruns_to_a_verified_whole(tiny: TinyBuild) -> None:
    rng = random.Random(SEED)
    for trial in range(KILLS):
        # Spread over the build: one point drawn from each of KILLS equal slices of its duration.
        delay = tiny.full_build_s * (trial + rng.random()) / KILLS
        fresh = trial % 2 == 1  # a first build (nothing to replace) or a --force rebuild over a whole one
        killed = kill_build_within(tiny.config, tiny.workspace, delay, *(() if fresh else ("--force",)), fresh=fresh)
        rerun, rerun_s = timed(run_build, tiny.config)
        verified = verify_build(tiny.workspace, tiny.repository)
        print(f"figures: kill {trial + 1} at {killed['delay_s']} s ({'fresh' if fresh else '--force'} build, in "
              f"{killed['stage']}): rerun exit {rerun.returncode} in {rerun_s} s, {verified.files} files verified")
        assert not killed["finished_first"], killed
        assert rerun.returncode == 0, rerun.stdout[-3000:]
        assert not verified.problems and verified.files > 0, verified.problems


def _limit_file_size() -> None:
    # The kernel's answer to a write past RLIMIT_FSIZE is SIGXFSZ (kills) unless ignored: then EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT_BYTES, FILE_LIMIT_BYTES))


def test_a_full_disk_during_an_artifact_write_is_one_line_and_leaves_no_partial_artifact(tiny: TinyBuild) -> None:
    _whole(tiny)
    before = json.loads((tiny.workspace / "export_onnx" / ".stage.json").read_text())
    result = run_build(tiny.config, "--force", "--stages", "export_onnx", preexec_fn=_limit_file_size)
    print(f"figures: export under a {FILE_LIMIT_BYTES // 1024} KiB file limit: exit {result.returncode}, "
          f"{_errors(result.stdout)}")
    assert result.returncode == 3, result.stdout[-3000:]
    errors = _errors(result.stdout)
    assert len(errors) == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    assert errors[0].startswith("error: export_onnx: File too large") and errors[0].endswith("free space and rerun")
    report = json.loads((tiny.workspace / "report.json").read_text())
    assert report["status"] == "failed" and report["error"] in errors[0]
    # The old artifact stands as recorded; no temp directory, no half-written model.onnx anywhere.
    assert json.loads((tiny.workspace / "export_onnx" / ".stage.json").read_text()) == before
    assert not list(tiny.workspace.glob(".export_onnx.*"))
    verified = verify_build(tiny.workspace, tiny.repository)
    assert [p for p in verified.problems if "report.json" not in p] == [], verified.problems
    _whole(tiny)  # and the next build, with room, passes


def test_a_failed_retention_gate_exits_4_and_the_next_build_tries_again(tiny: TinyBuild) -> None:
    _whole(tiny)
    strict = tiny.variant("strict", eval={"min_retention": 1.0})  # the tiny model retains nothing
    log = tiny.workspace / "build.log"  # each build's own
    for attempt in (1, 2):
        result = run_build(strict)
        assert result.returncode == 4, result.stdout[-3000:]
        errors = _errors(result.stdout)
        assert len(errors) == 1 and "gate failed (retention:" in errors[0], result.stdout[-3000:]
        stages = {s["name"]: s["status"] for s in json.loads((tiny.workspace / "report.json").read_text())["stages"]}
        assert stages["evaluate"] == "failed", stages
        assert json.loads((tiny.workspace / "evaluate" / ".stage.json").read_text())["status"] == "failed"
        # Ran again, not served from the cache as passed: the failed record is never reused.
        assert "evaluate: running" in log.read_text(), attempt
    _whole(tiny)


def test_ctrl_c_mid_stage_exits_130_and_the_report_says_interrupted(tiny: TinyBuild) -> None:
    _whole(tiny)
    before = json.loads((tiny.workspace / "export_onnx" / ".stage.json").read_text())
    log = tiny.workspace / "build.log"  # each build's own
    log.unlink()
    process = start_build(tiny.config, "--force", "--stages", "export_onnx")
    deadline = time.monotonic() + 120
    while not log.is_file() or "export_onnx: running" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, "the export never started"
        time.sleep(0.1)
    time.sleep(1.0)  # inside the export (about 9 s on the tiny model)
    assert process.poll() is None
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    print(f"figures: SIGINT 1 s into export_onnx: exit {process.returncode}")
    # 130, or killed by the SIGINT itself (-2): a shell shows both as 130. The latter was seen once in a
    # full suite run, after the build had printed its interrupted line and finished report.json; the
    # cause is not known.
    assert process.returncode in (130, -signal.SIGINT), output[-3000:]
    assert "interrupted" in output and "Traceback" not in output, output[-3000:]
    report = json.loads((tiny.workspace / "report.json").read_text())
    assert report["status"] == "interrupted" and report["error"] == "interrupted by the user"
    assert {s["name"]: s["status"] for s in report["stages"]}["export_onnx"] == "interrupted", report["stages"]
    assert json.loads((tiny.workspace / "export_onnx" / ".stage.json").read_text()) == before
    assert not list(tiny.workspace.glob(".export_onnx.*"))
    _whole(tiny)


def test_serve_without_a_repository_exits_5_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "toolkit", "serve", "-r", str(tmp_path / "missing"), "--log-dir", str(tmp_path),
         "--http-port", "auto", "--grpc-port", "auto", "--metrics-port", "auto", "--port", "auto"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 5, result.stdout + result.stderr
    assert _errors(result.stdout + result.stderr) == [
        f"error: model repository {tmp_path / 'missing'} does not exist; run `toolkit build` first"]
