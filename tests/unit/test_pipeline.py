"""The stage cache, atomic artifacts and the report, with tiny stand-in stage modules."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from toolkit.config import BuildConfig
from toolkit.errors import GateError, StageError
from toolkit.pipeline import StageContext, StageResult, StageSpec, run_build
from toolkit.report import GateResult

CALLS: list[str] = []


def _module(name: str, body) -> str:  # type: ignore[no-untyped-def]
    mod = types.ModuleType(f"fake_stage_{name}")
    mod.run = body  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    return mod.__name__


def _first(ctx: StageContext) -> StageResult:
    CALLS.append("first")
    (ctx.out_dir / "a.txt").write_text(f"rank={ctx.config.lora.rank}")
    return StageResult(metrics={"n": 1}, artifacts={"a": "a.txt"})


def _second(ctx: StageContext) -> StageResult:
    CALLS.append("second")
    upstream = ctx.inputs["first"].path("a").read_text()
    (ctx.out_dir / "b.txt").write_text(upstream + "+b")
    return StageResult(artifacts={"b": "b.txt"}, gates=[GateResult(name="ok", passed=True)])


def _specs(second=_second) -> tuple[StageSpec, ...]:  # type: ignore[no-untyped-def]
    return (
        StageSpec("first", _module("first", _first), ("lora",)),
        StageSpec("second", _module("second", second), ("train",), ("first",)),
    )


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()


def _config(tmp_path: Path, **lora: object) -> BuildConfig:
    return BuildConfig.model_validate({"workspace": str(tmp_path / "ws"), "lora": lora})


def test_second_run_skips_every_stage(tmp_path: Path) -> None:
    run_build(_config(tmp_path), stages=_specs())
    assert CALLS == ["first", "second"]
    report = run_build(_config(tmp_path), stages=_specs())
    assert CALLS == ["first", "second"]
    assert [s.status for s in report.stages] == ["skipped", "skipped"]
    saved = json.loads((tmp_path / "ws" / "report.json").read_text())
    assert saved["status"] == "passed"
    assert (tmp_path / "ws" / "second" / "b.txt").read_text() == "rank=16+b"


def test_changed_section_reruns_that_stage_and_downstream_only(tmp_path: Path) -> None:
    run_build(_config(tmp_path), stages=_specs())
    CALLS.clear()
    cfg = BuildConfig.model_validate({"workspace": str(tmp_path / "ws"), "train": {"max_steps": 3}})
    run_build(cfg, stages=_specs())
    assert CALLS == ["second"]
    CALLS.clear()
    run_build(_config(tmp_path, rank=4), stages=_specs())
    assert CALLS == ["first", "second"]


def test_force_and_stage_selection(tmp_path: Path) -> None:
    run_build(_config(tmp_path), stages=_specs())
    CALLS.clear()
    run_build(_config(tmp_path), stages=_specs(), force=True, only=["second"])
    assert CALLS == ["second"]


def test_edited_artifact_invalidates_cache(tmp_path: Path) -> None:
    run_build(_config(tmp_path), stages=_specs())
    CALLS.clear()
    (tmp_path / "ws" / "first" / "a.txt").write_text("tampered, longer than before")
    report = run_build(_config(tmp_path), stages=_specs())
    # first is rebuilt; it produces the same content again, so second (keyed on content) stays cached
    assert CALLS == ["first"]
    assert [s.status for s in report.stages] == ["ran", "skipped"]
    assert (tmp_path / "ws" / "first" / "a.txt").read_text() == "rank=16"


def test_failed_stage_leaves_no_half_written_artifact(tmp_path: Path) -> None:
    def broken(ctx: StageContext) -> StageResult:
        (ctx.out_dir / "b.txt").write_text("half")
        raise StageError("disk on fire")

    with pytest.raises(StageError):
        run_build(_config(tmp_path), stages=_specs(second=broken))
    ws = tmp_path / "ws"
    assert not (ws / "second").exists()
    assert not list(ws.glob(".second.tmp-*"))
    report = json.loads((ws / "report.json").read_text())
    assert report["status"] == "failed" and "disk on fire" in report["error"]
    # the next run picks up where it stopped: first is cached
    CALLS.clear()
    run_build(_config(tmp_path), stages=_specs())
    assert CALLS == ["second"]


def test_blocking_gate_failure_fails_build_and_is_not_cached(tmp_path: Path) -> None:
    def gated(ctx: StageContext) -> StageResult:
        CALLS.append("gated")
        return StageResult(gates=[GateResult(name="parity", passed=False, value=0.5, threshold=1.0)])

    with pytest.raises(GateError, match="parity"):
        run_build(_config(tmp_path), stages=_specs(second=gated))
    with pytest.raises(GateError):
        run_build(_config(tmp_path), stages=_specs(second=gated))
    assert CALLS.count("gated") == 2
    md = (tmp_path / "ws" / "report.md").read_text()
    assert "| parity | FAIL |" in md


def test_unknown_stage_is_a_config_error(tmp_path: Path) -> None:
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage"):
        run_build(_config(tmp_path), stages=_specs(), only=["nope"])
    with pytest.raises(ConfigError, match="needs first"):
        run_build(_config(tmp_path), stages=_specs(), only=["second"])
