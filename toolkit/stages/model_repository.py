"""Stage ``repository``: version N+1 of the Triton model repository, and the capacity it plans for.

The repository itself is :func:`toolkit.repository.writer.write_repository`'s; this stage feeds it
the build's artifacts (the merged model, the FP32 export, the INT8 variant only when it passed its
gate, the TensorRT plans where they were built, the INT8 plan script only when its Q/DQ graph passed
its gate); ``repository.serving_precision`` picks the core model served. It also writes
``capacity.md`` (:mod:`toolkit.repository.capacity`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from toolkit.buildsys.config import RepositorySection, ServingSection, TensorRTSection
from toolkit.buildsys.stage_api import StageContext, StageRecord, StageResult
from toolkit.files import sha256_file
from toolkit.repository.capacity import capacity_report
from toolkit.repository.contract import LMInfo
from toolkit.repository.manifest import BUILD_METRICS, BuildFacts, GateSummary
from toolkit.repository.plan_script import int8_plan_source
from toolkit.repository.spec import Batching, GenerationLimits, PlanSpec, RepositorySpec
from toolkit.repository.writer import TrtInputs, served_core_precision, write_repository


def repository_spec(repo: RepositorySection, serving: ServingSection, *, context_length: int) -> RepositorySpec:
    """What the repository is written with, from the build config's sections (where its values are set)."""
    return RepositorySpec(
        batching=Batching(max_batch_size=repo.max_batch_size, preferred_batch_sizes=tuple(repo.preferred_batch_sizes),
                          max_queue_delay_us=repo.max_queue_delay_us, instance_count=repo.instance_count),
        limits=GenerationLimits(max_active_sequences=serving.max_active_sequences, max_queue=serving.max_queue,
                                max_new_tokens_limit=serving.max_new_tokens_limit,
                                grammar_compile_timeout_s=serving.grammar_compile_timeout_s),
        context_length=context_length, serving_precision=repo.serving_precision, runner=repo.runner,
        keep_versions=repo.keep_versions,
    )


def plan_spec(trt: TensorRTSection) -> PlanSpec:
    """The TensorRT plans' build script settings, from the build config's section."""
    return PlanSpec(precisions=tuple(trt.precisions), trtexec=trt.trtexec, opt_batch_size=trt.opt_batch_size,
                    max_input_len=trt.max_input_len, workspace_mib=trt.workspace_mib)


def adapter_sha256(finetune: StageRecord) -> str:
    """sha256 of the LoRA weights the fine-tune stage saved (its artifact digest if there are none)."""
    weights = finetune.path("adapter") / "adapter_model.safetensors"
    return sha256_file(weights) if weights.is_file() else finetune.digest


def _gate_value(value: Any) -> float | str | None:
    if value is None or isinstance(value, float | int | str) and not isinstance(value, bool):
        return value
    return str(value)


def build_facts(inputs: Mapping[str, StageRecord]) -> BuildFacts:
    """The evaluate stage's key scores and every upstream stage's gates, as far as they were recorded.

    Read with ``.get`` throughout: a record of an older or partial build may lack any of them.
    """
    evaluate = inputs.get("evaluate")
    metrics = {key: float(value) for key in BUILD_METRICS
               if evaluate is not None and isinstance(value := evaluate.metrics.get(key), float | int)
               and not isinstance(value, bool)}
    gates = [
        GateSummary(stage=name, name=str(gate.get("name", "?")), passed=bool(gate.get("passed")),
                    blocking=bool(gate.get("blocking", True)), value=_gate_value(gate.get("value")),
                    threshold=_gate_value(gate.get("threshold")))
        for name, record in inputs.items()
        for gate in record.data.get("gates", []) if isinstance(gate, dict)
    ]
    return BuildFacts(metrics=metrics, gates=gates)


def run(ctx: StageContext) -> StageResult:
    """Write the repository to ``repository.output``; report its versions, notes and capacity."""
    cfg = ctx.config
    onnx_fp32 = ctx.inputs["export_onnx"].path("model")
    merged_dir = ctx.inputs["merge"].path("model")
    quantize = ctx.inputs["quantize"]
    int8_shipped = bool(quantize.metrics.get("int8_shipped"))
    failed = [str(g.get("name")) for g in quantize.data.get("gates", [])
              if isinstance(g, dict) and not g.get("passed") and str(g.get("name", "")).startswith("onnx_int8")]
    served_core_precision(cfg.repository.serving_precision, int8_shipped=int8_shipped,
                          why_not=f"failed {', '.join(failed)}" if failed else "")  # int8 asked, not passed: fail here
    notes: list[str] = []
    if not int8_shipped:
        notes.append("onnx_int8 left out of the repository: the INT8 variant was not shipped (failed or skipped "
                     f"its quality gate{': ' + ', '.join(failed) if failed else ''})")
    qdq_onnx, qdq_why_not = int8_plan_source(quantize.path("qdq") if "qdq" in quantize.artifacts else None,
                                              quantize.metrics)
    trt_record = ctx.inputs["tensorrt"]
    built = {p: trt_record.dir / p for p in ("fp16", "int8") if f"plan_{p}" in trt_record.artifacts}
    written = write_repository(
        cfg.repository.output, model_name=cfg.model.name, merged_dir=merged_dir,
        spec=repository_spec(cfg.repository, cfg.serving, context_length=cfg.model.context_length),
        onnx_fp32=onnx_fp32, onnx_int8=quantize.path("int8") if int8_shipped else None,
        base_model=str(ctx.inputs["base_model"].metrics.get("source", cfg.model.base)),
        adapter_sha256=adapter_sha256(ctx.inputs["finetune"]),
        trt_inputs=TrtInputs(plan=plan_spec(cfg.tensorrt), qdq_onnx=qdq_onnx, qdq_missing=qdq_why_not, built=built),
        build=build_facts(ctx.inputs),
    )
    notes += written.notes
    lm = LMInfo.from_hf_config(merged_dir)
    capacity = capacity_report(lm, context_length=cfg.model.context_length,
                               memory_budget_gib=cfg.serving.memory_budget_gib,
                               weights_bytes=onnx_fp32.stat().st_size,
                               max_batch_size=cfg.repository.max_batch_size,
                               max_active_sequences=cfg.serving.max_active_sequences)
    (ctx.out_dir / "capacity.md").write_text(capacity.markdown(), encoding="utf-8")
    (ctx.out_dir / "written.json").write_text(json.dumps({
        "root": str(written.root), "version": written.version,
        "version_dirs": [str(p) for p in written.version_dirs],
        "pruned": [str(p) for p in written.pruned]}, indent=2) + "\n", encoding="utf-8")
    return StageResult(
        metrics={"repository": str(written.root.resolve()), "version": written.version,
                 "models": [d.name for d in written.model_dirs], "serving_core_model":
                 written.manifest.serving_core_model, "precisions": written.manifest.precisions,
                 "pruned": len(written.pruned), "capacity": capacity.as_dict(), "notes": notes},
        artifacts={"capacity": "capacity.md", "written": "written.json"},
        note=f"version {written.version} in {written.root}" + (f"; {'; '.join(notes)}" if notes else ""),
        # Recorded with their hashes (the stage record's external_files): a later build reruns this
        # stage when any of them changed, and a check can verify the repository against them.
        external=[str(p.resolve()) for p in (*written.version_dirs, *written.shared_files)],
    )
