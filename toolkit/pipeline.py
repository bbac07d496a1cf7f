"""The build: an explicit, ordered list of stages, each cached on a hash of its inputs.

A stage is a module with one function ``run(ctx: StageContext) -> StageResult``. It writes into
``ctx.out_dir``, a temp directory the pipeline renames to ``<workspace>/<stage>`` only on success,
so an interrupted build never leaves a half-written artifact behind. The stage's cache key covers
its config sections, its upstream artifacts' content hashes (recorded in their ``.stage.json``,
not recomputed), the toolkit version, the source of the stage module and of the toolkit modules it
imports (:mod:`toolkit.sources`), and whatever the module's optional ``cache_inputs(config)``
returns (e.g. dataset file hashes); when the key matches and the recorded files are unchanged
(size and mtime), the stage is skipped.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from toolkit import __version__
from toolkit.config import BuildConfig, section_dump
from toolkit.errors import ConfigError, GateError, ToolkitError
from toolkit.report import BuildReport, GateResult, StageReport, write_report
from toolkit.sources import SourceHasher
from toolkit.workspace import (
    atomic_dir,
    atomic_write_json,
    clean_stale_temps,
    file_manifest,
    manifest_digest,
    manifest_unchanged,
    sha256_file,
    sha256_json,
)

log = logging.getLogger(__name__)

RECORD = ".stage.json"


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    sections: tuple[str, ...]
    depends_on: tuple[str, ...] = ()
    description: str = ""


# The build, in order. Each stage's inputs are its config sections and its upstream artifacts.
STAGES: tuple[StageSpec, ...] = (
    # Only what selects the weights: renaming the served model must not retrain it.
    StageSpec("base_model", "toolkit.stages.base_model", ("model.base", "model.allow_hub_download"), (),
              "embedded/local base model"),
    StageSpec("data", "toolkit.stages.data", ("data",), (), "load, clean and split datasets"),
    StageSpec("control", "toolkit.stages.control", ("train.control_examples", "train.seed"), ("base_model",),
              "self-distilled general examples"),
    StageSpec(
        "finetune", "toolkit.stages.finetune", ("lora", "train", "data.max_seq_len"),
        ("base_model", "data", "control"), "PEFT LoRA fine-tune",
    ),
    StageSpec("evaluate", "toolkit.stages.evaluate", ("eval",), ("base_model", "data", "finetune"),
              "BLEU/ROUGE/exact match before and after"),
    StageSpec("merge", "toolkit.stages.merge", (), ("base_model", "finetune"), "merge_and_unload + gate"),
    StageSpec("export_onnx", "toolkit.stages.export_onnx", ("export",), ("merge",),
              "ONNX with KV cache + FP32 parity gate"),
    StageSpec("quantize", "toolkit.stages.quantize", ("quantize",), ("merge", "export_onnx", "data"),
              "INT8 ONNX + fidelity/speed gate"),
    StageSpec("tensorrt", "toolkit.stages.tensorrt", ("tensorrt", "repository.max_batch_size", "model.context_length"),
              ("export_onnx", "quantize"), "TensorRT FP16/INT8 plans"),
    StageSpec(
        "repository", "toolkit.stages.repository", ("model", "repository", "serving", "tensorrt"),
        # evaluate: its scores go into the manifest, beside every upstream gate
        ("base_model", "finetune", "evaluate", "merge", "export_onnx", "quantize", "tensorrt"),
        "Triton model repository",
    ),
    StageSpec("triton_gate", "toolkit.stages.triton_gate", ("serving.triton_gate",),
              ("export_onnx", "repository"), "golden prompts through a real Triton"),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


@dataclass
class StageRecord:
    """What a finished stage left: its directory, metrics and artifact digest."""

    name: str
    dir: Path
    key: str
    digest: str
    metrics: dict[str, Any]
    artifacts: dict[str, str]
    data: dict[str, Any]

    def path(self, artifact: str) -> Path:
        return self.dir / self.artifacts[artifact]


@dataclass
class StageResult:
    """What a stage's ``run`` returns."""

    metrics: dict[str, Any] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path relative to out_dir
    status: Literal["ran", "unavailable"] = "ran"
    note: str = ""
    external: list[str] = field(default_factory=list)  # paths outside out_dir that must exist for a skip


@dataclass
class StageContext:
    config: BuildConfig
    out_dir: Path
    inputs: dict[str, StageRecord]
    workspace: Path


def source_hash(module: Any, hashers: dict[str, SourceHasher] | None = None) -> str:
    """Digest of the stage module's source and the package modules it imports (see toolkit.sources).

    `hashers` memoises file hashes across the stages of one build. A module with no file on disk
    (a test stand-in) hashes as "unknown".
    """
    module_file = getattr(module, "__file__", None)
    package = module.__name__.partition(".")[0]
    package_file = getattr(sys.modules.get(package), "__file__", None)
    try:
        if not module_file:
            return "unknown"
        if not package_file or Path(package_file).name != "__init__.py":  # a lone module, no package
            return sha256_file(Path(module_file))
        hashers = {} if hashers is None else hashers
        hasher = hashers.setdefault(package, SourceHasher(package, Path(package_file).parent))
        return hasher.digest(module.__name__)
    except OSError:
        return "unknown"


def cache_inputs(module: Any, config: BuildConfig) -> dict[str, Any]:
    """What the module's optional ``cache_inputs(config)`` declares beyond its config sections."""
    declared: Callable[[BuildConfig], dict[str, Any]] | None = getattr(module, "cache_inputs", None)
    return declared(config) if declared is not None else {}


def _load_record(stage_dir: Path) -> StageRecord | None:
    record_path = stage_dir / RECORD
    if not record_path.is_file():
        return None
    data = json.loads(record_path.read_text())
    if data.get("status") not in ("ran", "unavailable") or not manifest_unchanged(stage_dir, data["files"]):
        return None
    if any(not Path(p).exists() for p in data.get("external", [])):
        return None
    return StageRecord(
        name=data["name"], dir=stage_dir, key=data["key"], digest=data["digest"],
        metrics=data.get("metrics", {}), artifacts=data.get("artifacts", {}), data=data,
    )


def stage_key(
    spec: StageSpec, config: BuildConfig, inputs: dict[str, StageRecord], source: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """The stage's cache key: everything that decides its artifact. `extra` is the module's cache_inputs."""
    return sha256_json({
        "stage": spec.name,
        "toolkit": __version__,
        "source": source,
        "config": section_dump(config, *spec.sections),
        "inputs": {name: rec.digest for name, rec in sorted(inputs.items())},
        "extra": extra or {},
    })


def select_stages(only: list[str] | None, names: tuple[str, ...] = STAGE_NAMES) -> set[str]:
    if not only:
        return set(names)
    unknown = [s for s in only if s not in names]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(names)}")
    return set(only)


def run_build(
    config: BuildConfig,
    *,
    force: bool = False,
    only: list[str] | None = None,
    until: str | None = None,
    stages: tuple[StageSpec, ...] = STAGES,
) -> BuildReport:
    """Run the build; return the report (also written to the workspace). Raises on a failed stage or gate."""
    names = tuple(s.name for s in stages)
    selected = select_stages(only, names)
    if until is not None:
        if until not in names:
            raise ConfigError(f"unknown stage {until!r}; stages are: {', '.join(names)}")
        selected &= set(names[: names.index(until) + 1])
    ws = config.workspace
    ws.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(ws)
    report = BuildReport.start(config)
    records: dict[str, StageRecord] = {}
    hashers: dict[str, SourceHasher] = {}
    try:
        for spec in stages:
            stage_dir = ws / spec.name
            existing = _load_record(stage_dir)
            if spec.name not in selected:
                if existing is not None:
                    records[spec.name] = existing
                    report.add(StageReport.from_record(spec.name, existing.data, status="cached", stage_dir=stage_dir))
                else:
                    report.add(StageReport(name=spec.name, status="not-run"))
                continue
            missing = [d for d in spec.depends_on if d not in records]
            if missing:
                raise ConfigError(
                    f"stage {spec.name} needs {', '.join(missing)}, which has no valid artifact; "
                    f"run without --stages (or include {', '.join(missing)})"
                )
            inputs = {d: records[d] for d in spec.depends_on}
            module = importlib.import_module(spec.module)
            key = stage_key(spec, config, inputs, source_hash(module, hashers), cache_inputs(module, config))
            if existing is not None and existing.key == key and not force:
                log.info("%s: skipped (inputs unchanged)", spec.name)
                records[spec.name] = existing
                report.add(StageReport.from_record(spec.name, existing.data, status="skipped", stage_dir=stage_dir))
                write_report(report, ws)
                continue
            records[spec.name] = _run_stage(spec, module, config, inputs, key, report)
            write_report(report, ws)
    except ToolkitError as err:
        report.finish(status="failed", error=str(err))
        write_report(report, ws)
        raise
    except KeyboardInterrupt:
        report.finish(status="interrupted", error="interrupted by the user")
        write_report(report, ws)
        raise
    report.finish(status="passed")
    write_report(report, ws)
    return report


def _run_stage(
    spec: StageSpec, module: Any, config: BuildConfig, inputs: dict[str, StageRecord], key: str,
    report: BuildReport,
) -> StageRecord:
    ws = config.workspace
    stage_dir = ws / spec.name
    log.info("%s: running (%s)", spec.name, spec.description)
    started = time.perf_counter()
    with atomic_dir(stage_dir) as tmp:
        ctx = StageContext(config=config, out_dir=tmp, inputs=inputs, workspace=ws)
        try:
            result: StageResult = module.run(ctx)
        except ToolkitError as err:
            report.add(StageReport(name=spec.name, status="failed", duration_s=time.perf_counter() - started,
                                   note=str(err)))
            raise
        duration = time.perf_counter() - started
        files = file_manifest(tmp)
        failed = [g for g in result.gates if not g.passed and g.blocking]
        data: dict[str, Any] = {
            "name": spec.name,
            "key": key,
            "status": "failed" if failed else result.status,
            "note": result.note,
            "duration_s": round(duration, 3),
            "metrics": result.metrics,
            "gates": [g.model_dump() for g in result.gates],
            "artifacts": result.artifacts,
            "external": result.external,
            "files": files,
            "digest": manifest_digest(files),
        }
        atomic_write_json(tmp / RECORD, data)
    report.add(StageReport.from_record(spec.name, data, status=data["status"], stage_dir=stage_dir))
    if failed:
        names = "; ".join(f"{g.name}: {g.detail}" for g in failed)
        raise GateError(f"stage {spec.name}: gate failed ({names}); see {ws / 'report.md'}")
    return StageRecord(name=spec.name, dir=stage_dir, key=key, digest=data["digest"], metrics=result.metrics,
                       artifacts=result.artifacts, data=data)
