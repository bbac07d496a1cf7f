"""The stage cache, atomic artifacts and the report, with tiny stand-in stage modules."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import toolkit
from toolkit.buildsys.code_digest import SourceHasher
from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.report import GateResult
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.errors import GateError, StageError
from toolkit.stages.pipeline import STAGES, StageSpec, run_build

CALLS: list[str] = []


Stage = Callable[[StageContext], StageResult]


def _module(name: str, body: Stage) -> types.ModuleType:
    mod = types.ModuleType(f"fake_stage_{name}")
    mod.run = body  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    return mod


def _first(ctx: StageContext) -> StageResult:
    CALLS.append("first")
    (ctx.out_dir / "a.txt").write_text(f"rank={ctx.config.lora.rank}")
    return StageResult(metrics={"n": 1}, artifacts={"a": "a.txt"})


def _second(ctx: StageContext) -> StageResult:
    CALLS.append("second")
    upstream = ctx.inputs["first"].path("a").read_text()
    (ctx.out_dir / "b.txt").write_text(upstream + "+b")
    return StageResult(artifacts={"b": "b.txt"}, gates=[GateResult(name="ok", passed=True)])


def _specs(second: Stage = _second) -> tuple[StageSpec, ...]:
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


def test_an_os_error_in_a_stage_is_one_line_and_a_finished_report(tmp_path: Path) -> None:
    def disk_full(ctx: StageContext) -> StageResult:
        (ctx.out_dir / "b.txt").write_text("half")
        raise OSError(28, "No space left on device", str(ctx.out_dir / "model.onnx"))

    with pytest.raises(StageError) as raised:
        run_build(_config(tmp_path), stages=_specs(second=disk_full))
    message = str(raised.value)
    assert "\n" not in message and message.startswith("second: No space left on device: ")
    assert message.endswith("model.onnx; free space and rerun")
    ws = tmp_path / "ws"
    assert not (ws / "second").exists() and not list(ws.glob(".second.*"))  # no partial artifact
    report = json.loads((ws / "report.json").read_text())
    assert report["status"] == "failed" and report["error"] == message and report["finished_at"]
    assert [s["status"] for s in report["stages"]] == ["ran", "failed"]


def test_ctrl_c_in_a_stage_is_reported_as_that_stage_interrupted(tmp_path: Path) -> None:
    def interrupted(ctx: StageContext) -> StageResult:
        (ctx.out_dir / "b.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_build(_config(tmp_path), stages=_specs(second=interrupted))
    ws = tmp_path / "ws"
    assert not (ws / "second").exists() and not list(ws.glob(".second.*"))
    report = json.loads((ws / "report.json").read_text())
    assert report["status"] == "interrupted" and report["error"] == "interrupted by the user"
    assert [(s["name"], s["status"]) for s in report["stages"]] == [("first", "ran"), ("second", "interrupted")]


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


# ---------------------------------------------------------------- what the key covers: code and declared inputs


def test_cache_inputs_are_part_of_the_key(tmp_path: Path) -> None:
    declared = {"dataset": "hash-1"}
    mod = _module("first", _first)
    mod.cache_inputs = lambda config: dict(declared)  # type: ignore[attr-defined]
    specs = (StageSpec("first", mod, ("lora",)),
             StageSpec("second", _module("second", _second), ("train",), ("first",)))
    run_build(_config(tmp_path), stages=specs)
    run_build(_config(tmp_path), stages=specs)
    assert CALLS == ["first", "second"]
    declared["dataset"] = "hash-2"
    CALLS.clear()
    report = run_build(_config(tmp_path), stages=specs)
    # first reruns; it writes the same bytes again, so second (keyed on content) stays cached
    assert CALLS == ["first"]
    assert [s.status for s in report.stages] == ["ran", "skipped"]


def test_a_changed_file_outside_the_workspace_reruns_its_stage(tmp_path: Path) -> None:
    """The repository stage's versions and configs live outside the workspace: recorded with hashes."""
    outside = tmp_path / "repo" / "config.pbtxt"

    def publish(ctx: StageContext) -> StageResult:
        CALLS.append("publish")
        outside.parent.mkdir(exist_ok=True)
        outside.write_text("version 1")
        return StageResult(external=[str(outside)])

    specs = (StageSpec("publish", _module("publish", publish), ()),)
    run_build(_config(tmp_path), stages=specs)
    record = json.loads((tmp_path / "ws" / "publish" / ".stage.json").read_text())
    assert record["external_files"][str(outside)]["sha256"] == hashlib.sha256(b"version 1").hexdigest()
    assert [s.status for s in run_build(_config(tmp_path), stages=specs).stages] == ["skipped"]
    outside.write_text("version 2")  # a build killed after rewriting it, before its record; or a hand edit
    assert [s.status for s in run_build(_config(tmp_path), stages=specs).stages] == ["ran"]
    assert CALLS == ["publish", "publish"]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An on-disk package `fakepkg` with two stages: `uses` imports `helper` (through `middle`,
    inside a function), `alone` imports only `stages.pipeline`, which is left out of every key."""
    root = tmp_path / "src" / "fakepkg"
    stage = """
        from toolkit.buildsys.stage_api import StageResult
        from fakepkg.stages import pipeline
        {imports}

        def run(ctx):
            (ctx.out_dir / "out.txt").write_text("{name}")
            return StageResult(artifacts={{"out": "out.txt"}})
    """
    _write(root, {
        "__init__.py": "",
        "helper.py": "VALUE = 1\n",
        "middle.py": "def value():\n    from .helper import VALUE\n    return VALUE\n",
        "stages/__init__.py": "",
        "stages/pipeline.py": "RUNNER = 1\n",
        "stages/uses.py": stage.format(name="uses", imports="from fakepkg.middle import value"),
        "stages/alone.py": stage.format(name="alone", imports=""),
    })
    monkeypatch.syspath_prepend(str(root.parent))
    yield root
    for name in [n for n in sys.modules if n == "fakepkg" or n.startswith("fakepkg.")]:
        del sys.modules[name]


def _fake_specs() -> tuple[StageSpec, ...]:
    return (StageSpec("alone", importlib.import_module("fakepkg.stages.alone"), ()),
            StageSpec("uses", importlib.import_module("fakepkg.stages.uses"), ()))


def test_editing_an_imported_module_reruns_only_the_stages_importing_it(tmp_path: Path, fake_package: Path) -> None:
    run_build(_config(tmp_path), stages=_fake_specs())
    assert [s.status for s in run_build(_config(tmp_path), stages=_fake_specs()).stages] == ["skipped", "skipped"]
    (fake_package / "helper.py").write_text("VALUE = 2  # edited\n")
    assert [s.status for s in run_build(_config(tmp_path), stages=_fake_specs()).stages] == ["skipped", "ran"]
    (fake_package / "stages" / "pipeline.py").write_text("RUNNER = 2  # the pipeline machinery: no stage reruns\n")
    assert [s.status for s in run_build(_config(tmp_path), stages=_fake_specs()).stages] == ["skipped", "skipped"]
    (fake_package / "stages" / "alone.py").write_text(
        (fake_package / "stages" / "alone.py").read_text() + "# edited\n")
    assert [s.status for s in run_build(_config(tmp_path), stages=_fake_specs()).stages] == ["ran", "skipped"]


def test_toolkit_stage_keys_follow_the_modules_they_import(tmp_path: Path) -> None:
    """On a copy of the real package: quality/fidelity.py reruns only the stages that use it; the control
    prompts rerun the stages that read toolkit.datasets.records; the Triton model.py reruns the repository."""
    root = tmp_path / "toolkit"
    shutil.copytree(Path(toolkit.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))

    def digests() -> dict[str, str]:
        hasher = SourceHasher("toolkit", root)
        return {spec.name: hasher.digest(spec.stage.__name__) for spec in STAGES}

    def changed_by(rel: str) -> set[str]:
        before = digests()
        with (root / rel).open("a") as fh:
            fh.write("\n# edited\n" if rel.endswith(".py") else "\n")
        after = digests()
        return {name for name in before if before[name] != after[name]}

    assert changed_by("quality/fidelity.py") == {"export_onnx", "quantize"}
    assert {"data", "control", "finetune"} <= changed_by("datasets/control_prompts.json")
    assert "export_onnx" not in changed_by("datasets/control_prompts.json")
    assert changed_by("runtime/triton_model/model.py") == {"repository"}
    assert changed_by("runtime/scheduler.py") == {"repository"}  # imported by the copied model.py
    assert changed_by("stages/pipeline.py") == set()
    assert changed_by("buildsys/config.py") == set()  # keyed through the config sections' values instead


def test_an_unexpected_exception_in_a_stage_is_one_line_with_the_traceback_in_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def buggy(ctx: StageContext) -> StageResult:
        return {"no": "such key"}["model"]  # type: ignore[return-value]

    with pytest.raises(StageError) as raised:
        run_build(_config(tmp_path), stages=_specs(second=buggy))
    message = str(raised.value)
    assert raised.value.exit_code == 3
    assert "\n" not in message and message.startswith("second: unexpected KeyError: 'model' (traceback in ")
    assert message.endswith("build.log)")
    traced = [r for r in caplog.records if r.name == "toolkit-traceback"]
    assert traced and traced[0].exc_info is not None and "buggy" in caplog.text  # the traceback is kept
    ws = tmp_path / "ws"
    report = json.loads((ws / "report.json").read_text())
    assert report["status"] == "failed" and report["error"] == message
    assert not (ws / "second").exists()


def test_each_stage_records_its_own_peak_memory(tmp_path: Path) -> None:
    import numpy as np

    def big(ctx: StageContext) -> StageResult:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        (ctx.out_dir / "a.txt").write_text(str(block.sum()))
        return StageResult(artifacts={"a": "a.txt"})

    def small(ctx: StageContext) -> StageResult:
        (ctx.out_dir / "b.txt").write_text("b")
        return StageResult(artifacts={"b": "b.txt"})

    specs = (StageSpec("first", _module("big", big), ("lora",)),
             StageSpec("second", _module("small", small), ("train",), ("first",)))
    report = run_build(_config(tmp_path), stages=specs)
    first, second = (s.peak_rss_mib for s in report.stages)
    assert first is not None and second is not None
    assert first >= second + 250  # the second stage's mark was reset: it does not inherit the first's peak
    assert "| peak MiB |" in (tmp_path / "ws" / "report.md").read_text()


def test_a_stage_that_cannot_fit_in_memory_stops_the_build_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import toolkit.stages.pipeline as pipeline
    from toolkit.buildsys.memory import GIB, ModelSize

    monkeypatch.setattr(pipeline, "planned_size", lambda config, record: ModelSize(params=8 * 10**9, vocab=10))
    monkeypatch.setattr("toolkit.buildsys.memory.available_bytes", lambda: 24 * GIB)
    specs = (StageSpec("control", _module("first", _first), ("lora",)),  # too big too, but needs less
             StageSpec("export_onnx", _module("second", _second), ("train",), ("control",)))
    with pytest.raises(StageError) as raised:
        run_build(_config(tmp_path), stages=specs)
    assert CALLS == []  # refused up front, not after the first stage, naming the largest need
    assert str(raised.value).startswith("export_onnx needs about ")
    assert "x its 29.8 GiB of FP32 weights" in str(raised.value) and "24.0 GiB is available" in str(raised.value)


def test_the_memory_need_counts_weights_vocabulary_logits_and_gptq() -> None:
    import toolkit.stages.pipeline as pipeline
    from toolkit.buildsys.config import BuildConfig
    from toolkit.buildsys.memory import GIB, InsufficientMemoryError, ModelSize, Need, check_stage

    size = ModelSize(params=2**28, vocab=2**18)  # 1 GiB of FP32 weights; one [512, vocab] float tensor: 0.5 GiB
    assert Need(2.0, 1.0, 3).bytes(size) == int(2 * GIB + 1.5 * GIB + 1 * GIB)
    with pytest.raises(InsufficientMemoryError) as raised:
        check_stage("export_onnx", size, available=2 * GIB, need=Need(2.0, 1.0, 3))
    assert str(raised.value).startswith("export_onnx needs about 4.5 GiB for this model (2 x its 1.0 GiB of FP32 "
                                        "weights + 3 x 0.50 GiB of logits + 1 GiB), and 2.0 GiB is available")
    default = BuildConfig.model_validate({})
    assert pipeline.stage_need("quantize", default) is not None  # GPTQ rounds the Q/DQ graph by default
    rtn = BuildConfig.model_validate({"quantize": {"qdq_method": "weight_only"}})
    assert pipeline.stage_need("quantize", rtn) is None and pipeline.stage_need("export_onnx", default) is None
