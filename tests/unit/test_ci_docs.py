"""docs/ci.md's example jobs: the YAML parses, the command line runs, and every path it caches, uploads or
reports is where the build writes it."""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.report import GateResult
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.cli import app
from toolkit.stages import pipeline
from toolkit.stages.pipeline import StageSpec

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "ci.md").read_text(encoding="utf-8")
JOBS = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", DOC, re.DOTALL)]
GITHUB = next(job for job in JOBS if "jobs" in job)["jobs"]["build"]
GITLAB = next(job for job in JOBS if "build" in job and "script" in job["build"])["build"]
MAKE = re.compile(r"^make (?P<target>[\w-]+)(?: ARGS='(?P<args>[^']*)')?$")


def _build_command(commands: list[str]) -> tuple[str, list[str]]:
    """The make target and the toolkit arguments of the one `make` command among `commands`."""
    matches = [m for c in commands if (m := MAKE.match(c.strip()))]
    assert len(matches) == 1, commands
    return matches[0]["target"], shlex.split(matches[0]["args"] or "")


def _stand_in() -> Any:
    def run(ctx: StageContext) -> StageResult:
        (ctx.out_dir / "out.txt").write_text("made")
        return StageResult(artifacts={"out": "out.txt"}, gates=[GateResult(name="g", passed=True, value=1.0)])

    return type("StandIn", (), {"__name__": "stand_in", "run": staticmethod(run)})()


def _run_like_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, args: list[str]) -> Path:
    """Run `make <target> ARGS=...` as the Makefile would (``toolkit build $(ARGS)``) in a checkout at tmp_path."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^{target}:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe is not None and recipe.group(1) == "$(BIN)/toolkit build $(ARGS)", f"make {target}"
    real = pipeline.run_build
    stages = (StageSpec("stand_in", _stand_in(), ()),)
    monkeypatch.setattr(pipeline, "run_build", lambda config, **kw: real(config, stages=stages, **kw))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["build", *args])
    assert result.exit_code == 0, result.output
    return tmp_path


def _paths(value: str | list[str]) -> list[str]:
    lines = value if isinstance(value, list) else value.splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip()]


def test_github_actions_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = GITHUB["steps"]
    runs = [s["run"] for s in steps if "run" in s]
    target, args = _build_command(runs)
    checkout = _run_like_ci(tmp_path, monkeypatch, target, args)
    junit = args[args.index("--junit-xml") + 1]
    cache = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache@"))["with"]
    assert _paths(cache["path"]) == [str(BuildConfig().workspace)]  # the workspace the build reuses
    assert cache["key"].startswith(cache["restore-keys"].splitlines()[0])
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()"
    for path in _paths(upload["with"]["path"]):
        assert (checkout / path).is_file(), path
    reporter = next(s for s in steps if "junit-report" in str(s.get("uses", "")))
    assert reporter["with"]["report_paths"] == junit and ET.parse(checkout / junit).getroot().tag == "testsuites"
    summary = next(r for r in runs if "GITHUB_STEP_SUMMARY" in r)
    assert (checkout / shlex.split(summary)[1]).is_file()


def test_gitlab_ci_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, args = _build_command(GITLAB["script"])
    checkout = _run_like_ci(tmp_path, monkeypatch, target, args)
    assert str(BuildConfig().workspace) in _paths(GITLAB["cache"]["paths"])
    artifacts = GITLAB["artifacts"]
    assert artifacts["when"] == "always"
    for path in _paths(artifacts["paths"]):
        assert (checkout / path).is_file(), path
    junit = artifacts["reports"]["junit"]
    assert junit == args[args.index("--junit-xml") + 1]
    assert ET.parse(checkout / junit).getroot().find("testsuite/testcase") is not None
