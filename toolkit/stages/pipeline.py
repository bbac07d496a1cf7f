"""The build: an explicit, ordered list of stages, each cached on a hash of its inputs.

A stage is a module of :mod:`toolkit.stages` with one function ``run(ctx: StageContext) ->
StageResult`` (see :mod:`toolkit.buildsys.stage_api`). It writes into ``ctx.out_dir``, a temp directory the
pipeline renames to ``<workspace>/<stage>`` only on success, so an interrupted build never leaves a
half-written artifact behind. The stage's cache key covers its config sections, its upstream
artifacts' content hashes (recorded in their ``.stage.json``, not recomputed), the toolkit version,
the source of the stage module and of the toolkit modules it imports (:mod:`toolkit.buildsys.code_digest`), and
whatever the module's optional ``cache_inputs(config)`` returns (e.g. dataset file hashes); when the
key matches and the recorded files are unchanged (size and mtime), the stage is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.buildsys.code_digest import SourceHasher
from toolkit.buildsys.config import EMBEDDED_MODEL, BuildConfig, section_dump
from toolkit.buildsys.memory import (
    MIB,
    QUANTIZE_GPTQ,
    STAGE_NEEDS,
    ModelSize,
    Need,
    check_stage,
    peak_rss_bytes,
    release_memory,
    reset_peak,
)
from toolkit.buildsys.report import BuildReport, BuildStatus, StageReport, StageStatus, write_report
from toolkit.buildsys.stage_api import RECORD, Stage, StageContext, StageRecord, StageResult
from toolkit.errors import ConfigError, GateError, StageError, ToolkitError
from toolkit.files import (
    atomic_dir,
    atomic_write_json,
    clean_stale_temps,
    external_manifest,
    file_manifest,
    manifest_digest,
    manifest_unchanged,
    sha256_file,
    sha256_json,
)
from toolkit.stages import (
    base_model,
    baseline,
    control,
    data,
    evaluate,
    export_onnx,
    finetune,
    merge,
    model_repository,
    quantize,
    tensorrt,
    triton_gate,
)

log = logging.getLogger(__name__)
trace_log = logging.getLogger("toolkit-traceback")  # build.log only: the terminal gets the one-line error
# SmolLM2-135M-Instruct, the embedded base: its size before its GGUF is converted
EMBEDDED_SIZE = ModelSize(params=134_515_008, vocab=49_152)


@dataclass(frozen=True)
class StageSpec:
    """One step of the build: which stage runs, on which config sections and upstream artifacts."""

    name: str
    stage: Stage
    sections: tuple[str, ...]
    depends_on: tuple[str, ...] = ()
    description: str = ""


# The build, in order. Each stage's inputs are its config sections and its upstream artifacts.
STAGES: tuple[StageSpec, ...] = (
    # Only what selects the weights: renaming the served model must not retrain it.
    StageSpec("base_model", base_model, ("model.base", "model.allow_hub_download"), (), "embedded/local base model"),
    StageSpec("data", data, ("data",), (), "load, clean and split datasets"),
    StageSpec("control", control, ("train.control_examples", "train.seed"), ("base_model",),
              "self-distilled general examples"),
    # The base model's answers: cached apart, so a recipe change reruns only the fine-tuned half.
    StageSpec("baseline", baseline, ("eval.max_new_tokens", "eval.max_examples", "eval.batch_size"),
              ("base_model", "data"), "base-model answers to the test and retention questions"),
    StageSpec("finetune", finetune, ("lora", "train", "data.max_seq_len"), ("base_model", "data", "control"),
              "PEFT LoRA fine-tune"),
    StageSpec("merge", merge, (), ("base_model", "finetune"), "merge_and_unload + gate"),
    StageSpec("export_onnx", export_onnx, ("export",), ("merge",), "ONNX with KV cache + FP32 parity gate"),
    # The served FP32 graph answers: what ships is what is scored, on the fastest engine the build has.
    StageSpec("evaluate", evaluate, ("eval",), ("data", "baseline", "merge", "export_onnx"),
              "fact accuracy (test split, held-out questions), BLEU/ROUGE, retention"),
    # eval.*: the task gate compares the variants with the evaluate stage's FP32 answers, so it asks the
    # same questions with the same token budget and batch size
    StageSpec("quantize", quantize, ("quantize", "eval"),
              # control: GPTQ calibrates on general conversations as well as the dataset's
              ("merge", "export_onnx", "data", "control", "evaluate"),
              "INT8 ONNX + Q/DQ graph, task-quality gates, speed"),
    StageSpec("tensorrt", tensorrt, ("tensorrt", "repository.max_batch_size", "model.context_length"),
              ("export_onnx", "quantize"), "TensorRT FP16/INT8 plans"),
    StageSpec("repository", model_repository, ("model", "repository", "serving", "tensorrt"),
              # evaluate: its scores go into the manifest, beside every upstream gate
              ("base_model", "finetune", "evaluate", "merge", "export_onnx", "quantize", "tensorrt"),
              "Triton model repository"),
    StageSpec("triton_gate", triton_gate, ("serving.triton_gate",), ("export_onnx", "repository"),
              "golden prompts through a real Triton"),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


def source_hash(module: Any, hashers: dict[str, SourceHasher] | None = None) -> str:
    """Digest of the stage module's source and the package modules it imports (see toolkit.buildsys.code_digest).

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
    if data.get("status") not in (StageStatus.RAN, StageStatus.UNAVAILABLE) or not manifest_unchanged(
            stage_dir, data["files"]):
        return None
    if any(not Path(p).exists() for p in data.get("external", [])):
        return None
    # Files outside the workspace (the repository's versions, configs, scripts) as they were recorded:
    # a kill between a rewrite there and this record, or a hand edit, reruns the stage.
    if not manifest_unchanged(stage_dir, data.get("external_files", {})):
        log.info("%s: its files outside the workspace changed since it ran", data["name"])
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


def planned_size(config: BuildConfig, base_record: StageRecord | None) -> ModelSize | None:
    """The model's size before anything is loaded: the converted base if cached, else its source files."""
    try:
        if base_record is not None:
            return ModelSize.of_dir(base_record.path("model"))
        if config.model.base == EMBEDDED_MODEL:
            return EMBEDDED_SIZE
        local = Path(config.model.base).expanduser()
        if (local / "config.json").is_file():
            return ModelSize.of_dir(local)
    except (OSError, ValueError, ToolkitError):
        return None  # unreadable: the base_model stage says why, in one line
    return None  # a hub id: known once downloaded


def stage_need(name: str, config: BuildConfig) -> Need | None:
    """A stage's memory need where the configuration changes it (GPTQ rounding in quantize), else None."""
    q = config.quantize
    if name == "quantize" and q.enabled and ("gptq" in q.method or (q.emit_qdq and "gptq" in q.qdq_method)):
        return QUANTIZE_GPTQ
    return None


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
    size = planned_size(config, _load_record(ws / "base_model") if "base_model" in names else None)
    try:
        if size is not None:  # before any work: a stage that cannot fit fails the build now, not halfway,
            # naming the largest need (what a machine must have for the whole build)
            todo = [s.name for s in stages if s.name in selected and (force or _load_record(ws / s.name) is None)]
            needs = {name: (stage_need(name, config) or STAGE_NEEDS.get(name)) for name in todo}
            sized = [(need.bytes(size), name) for name, need in needs.items() if need is not None]
            if sized:
                largest = max(sized)[1]
                check_stage(largest, size, need=needs[largest])
        for spec in stages:
            stage_dir = ws / spec.name
            existing = _load_record(stage_dir)
            if spec.name not in selected:
                if existing is not None:
                    records[spec.name] = existing
                    report.add(StageReport.from_record(spec.name, existing.data, status=StageStatus.CACHED,
                                                       stage_dir=stage_dir))
                else:
                    report.add(StageReport(name=spec.name, status=StageStatus.NOT_RUN))
                continue
            missing = [d for d in spec.depends_on if d not in records]
            if missing:
                raise ConfigError(
                    f"stage {spec.name} needs {', '.join(missing)}, which has no valid artifact; "
                    f"run without --stages (or include {', '.join(missing)})"
                )
            inputs = {d: records[d] for d in spec.depends_on}
            key = stage_key(spec, config, inputs, source_hash(spec.stage, hashers), cache_inputs(spec.stage, config))
            if existing is not None and existing.key == key and not force:
                log.info("%s: skipped (inputs unchanged)", spec.name)
                records[spec.name] = existing
                report.add(StageReport.from_record(spec.name, existing.data, status=StageStatus.SKIPPED,
                                                   stage_dir=stage_dir))
                write_report(report, ws)
                continue
            release_memory()  # what earlier stages freed, before the guard reads what is available
            if size is not None:
                check_stage(spec.name, size, need=stage_need(spec.name, config))
            records[spec.name] = _run_stage(spec, config, inputs, key, report)
            if spec.name == "base_model":
                size = planned_size(config, records[spec.name])
            write_report(report, ws)
    except ToolkitError as err:
        report.finish(status=BuildStatus.FAILED, error=str(err))
        write_report(report, ws)
        raise
    except OSError as err:  # outside a stage's own work (its swap into place, the report): still one line
        line = os_error_line("build", err)
        report.finish(status=BuildStatus.FAILED, error=line)
        with contextlib.suppress(OSError):
            write_report(report, ws)
        raise StageError(line) from err
    except KeyboardInterrupt:
        report.finish(status=BuildStatus.INTERRUPTED, error="interrupted by the user")
        write_report(report, ws)
        raise
    report.finish(status=BuildStatus.PASSED)
    write_report(report, ws)
    return report


def os_error_line(stage: str, err: OSError) -> str:
    """``export_onnx: No space left on device: /ws/.export_onnx.tmp-x/model.onnx; free space and rerun``."""
    what = err.strerror or str(err)
    where = f": {err.filename}" if err.filename else ""
    hint = "; free space and rerun" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "; fix it and rerun"
    return f"{stage}: {what}{where}{hint}"


def _run_stage(
    spec: StageSpec, config: BuildConfig, inputs: dict[str, StageRecord], key: str, report: BuildReport,
) -> StageRecord:
    ws = config.workspace
    stage_dir = ws / spec.name
    log.info("%s: running (%s)", spec.name, spec.description)
    started = time.perf_counter()
    measured = reset_peak()
    with atomic_dir(stage_dir) as tmp:
        ctx = StageContext(config=config, out_dir=tmp, inputs=inputs, workspace=ws)
        try:
            try:
                result: StageResult = spec.stage.run(ctx)
            except OSError as err:  # a full disk, a permission: one line, not a traceback
                raise StageError(os_error_line(spec.name, err)) from err
            except (ToolkitError, KeyboardInterrupt):
                raise
            except Exception as err:  # a bug or a library's surprise: one line here, the traceback in build.log
                trace_log.exception("%s: unexpected error", spec.name)
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise StageError(f"{spec.name}: unexpected {type(err).__name__}{f': {first}' if first else ''} "
                                 f"(traceback in {ws / 'build.log'})") from err
        except ToolkitError as err:
            report.add(StageReport(name=spec.name, status=StageStatus.FAILED, duration_s=time.perf_counter() - started,
                                   note=str(err)))
            log.info("%s: failed after %.1f s", spec.name, time.perf_counter() - started)
            raise
        except KeyboardInterrupt:
            report.add(StageReport(name=spec.name, status=StageStatus.INTERRUPTED,
                                   duration_s=time.perf_counter() - started, note="interrupted by the user"))
            raise
        duration = time.perf_counter() - started
        files = file_manifest(tmp)
        failed = [g for g in result.gates if not g.passed and g.blocking]
        data: dict[str, Any] = {
            "name": spec.name,
            "key": key,
            "status": StageStatus.FAILED if failed else result.status,
            "note": result.note,
            "duration_s": round(duration, 3),
            "peak_rss_mib": round(peak_rss_bytes() / MIB) if measured else None,
            "metrics": result.metrics,
            "gates": [g.model_dump() for g in result.gates],
            "artifacts": result.artifacts,
            "external": result.external,
            "external_files": external_manifest(result.external),
            "files": files,
            "digest": manifest_digest(files),
        }
        atomic_write_json(tmp / RECORD, data)
    report.add(StageReport.from_record(spec.name, data, status=data["status"], stage_dir=stage_dir))
    log.info("%s: %s in %.1f s%s", spec.name, data["status"], duration, f": {result.note}" if result.note else "")
    for gate in result.gates:
        log.info("%s: gate %s", spec.name, gate.summary())
    if failed:
        names = "; ".join(f"{g.name}: {g.detail}" for g in failed)
        raise GateError(f"stage {spec.name}: gate failed ({names}); see {ws / 'report.md'}")
    return StageRecord(name=spec.name, dir=stage_dir, key=key, digest=data["digest"], metrics=result.metrics,
                       artifacts=result.artifacts, data=data)
