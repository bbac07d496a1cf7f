"""Stage ``tensorrt``: TensorRT FP16 and INT8 plans from the exported ONNX, built with ``trtexec``.

INT8 is built from the quantize stage's ``model_qdq.onnx`` only when that graph passed its
task-quality gate (``qdq_shipped``); otherwise no INT8 script is written and the report says why.

The profile and the command are :mod:`toolkit.repository.plan_script`'s. Where ``trtexec`` and a GPU
are present the plans are built and ``plan_meta.json`` records the TensorRT version, GPU and compute
capability, which :mod:`toolkit.repository.plan_compat` checks at load time. Elsewhere the stage is
``unavailable`` and leaves a ready-to-run ``build_plan.sh`` per precision. No plan is ever faked.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolkit.buildsys.report import StageStatus
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.files import atomic_write_json, run_tool
from toolkit.model_io.onnx_files import onnx_files
from toolkit.repository.contract import LMInfo
from toolkit.repository.plan_compat import BUILD_SCRIPT, PLAN_FILE, PLAN_META, gpu_facts, trt_version_from_tag
from toolkit.repository.plan_script import (
    TIMING_CACHE,
    build_script,
    int8_plan_source,
    kv_cache_profile,
    trtexec_command,
    write_build_script,
)


def plan_sources(ctx: StageContext) -> tuple[dict[str, Path], list[str]]:
    """precision -> source ONNX, and a report line for each precision that cannot be built."""
    sources: dict[str, Path] = {}
    notes: list[str] = []
    for precision in ctx.config.tensorrt.precisions:
        if precision == "fp16":
            sources["fp16"] = ctx.inputs["export_onnx"].path("model")
            continue
        quantize = ctx.inputs.get("quantize")
        source, why_not = int8_plan_source(
            quantize.path("qdq") if quantize is not None and "qdq" in quantize.artifacts else None,
            quantize.metrics if quantize is not None else {})
        if source is not None:
            sources["int8"] = source
        else:
            notes.append(f"INT8 plan not written: {why_not}")
    return sources, notes


def build_plan(cmd: Sequence[str], plan_dir: Path, build_script_path: Path, gpu: tuple[str, str]) -> dict[str, str]:
    """Run trtexec through run_tool; write and return plan_meta.json."""
    proc = run_tool(cmd, cwd=plan_dir, log_name="trtexec", timeout_s=4 * 3600)
    tag = re.search(r"TensorRT v(\d+)", proc.stdout + proc.stderr)
    meta = {"tensorrt_version": trt_version_from_tag(tag.group(1)) if tag else "unknown",
            "gpu_name": gpu[0], "compute_capability": gpu[1], "build_script": str(build_script_path)}
    atomic_write_json(plan_dir / PLAN_META, meta)
    return meta


def run(ctx: StageContext) -> StageResult:
    """Write a build script per precision; build the plans where trtexec and a GPU exist."""
    cfg = ctx.config
    lm = LMInfo.from_onnx(ctx.inputs["export_onnx"].path("model"))
    profile = kv_cache_profile(lm, max_batch=cfg.repository.max_batch_size, opt_batch=cfg.tensorrt.opt_batch_size,
                               max_input_len=cfg.tensorrt.max_input_len, context_length=cfg.model.context_length)
    sources, notes = plan_sources(ctx)
    artifacts: dict[str, str] = {}
    metrics: dict[str, Any] = {"profile": profile.as_dict(), "inputs": len(profile.min), "commands": {}}
    scripts: list[Path] = []
    for precision, onnx in sources.items():
        script = write_build_script(ctx.out_dir / precision / BUILD_SCRIPT, build_script(
            model=cfg.model.name, precision=precision, default_onnx=str(onnx.absolute()), plan=PLAN_FILE,
            timing_cache=f"../{TIMING_CACHE}", trtexec=cfg.tensorrt.trtexec, profile=profile,
            workspace_mib=cfg.tensorrt.workspace_mib, external_data=[p.name for p in onnx_files(onnx)[1:]]))
        scripts.append(script)
        artifacts[f"build_plan_{precision}"] = f"{precision}/{BUILD_SCRIPT}"
        cmd = trtexec_command(trtexec=cfg.tensorrt.trtexec, onnx=str(onnx.absolute()), plan=PLAN_FILE,
                              timing_cache=f"../{TIMING_CACHE}", precision=precision, profile=profile,
                              workspace_mib=cfg.tensorrt.workspace_mib)
        metrics["commands"][precision] = shlex.join(cmd)
    trtexec_path = shutil.which(cfg.tensorrt.trtexec)
    gpu = gpu_facts()
    # Name the scripts where they will be once the stage's temporary directory is renamed into place.
    final_dir = ctx.workspace / "tensorrt"
    where = ", ".join(str(final_dir / s.relative_to(ctx.out_dir)) for s in scripts) or str(final_dir)
    if trtexec_path is None or gpu is None:
        missing = "trtexec not on PATH" if trtexec_path is None else "no GPU (nvidia-smi found none)"
        found = "TensorRT not found" if trtexec_path is None else "no GPU"
        note = "; ".join([f"{found} ({missing}) — plan build scripts written to {where}; "
                          "run them on a machine with TensorRT and a GPU", *notes])
        metrics["not_buildable"] = notes
        return StageResult(status=StageStatus.UNAVAILABLE, note=note, metrics=metrics, artifacts=artifacts)
    built: dict[str, Any] = {}
    for precision, onnx in sources.items():
        plan_dir = ctx.out_dir / precision
        cmd = trtexec_command(trtexec=trtexec_path, onnx=str(onnx.absolute()), plan=PLAN_FILE,
                              timing_cache=f"../{TIMING_CACHE}", precision=precision, profile=profile,
                              workspace_mib=cfg.tensorrt.workspace_mib)
        built[precision] = build_plan(cmd, plan_dir, plan_dir / BUILD_SCRIPT, gpu)
        artifacts[f"plan_{precision}"] = f"{precision}/{PLAN_FILE}"
        artifacts[f"plan_meta_{precision}"] = f"{precision}/{PLAN_META}"
    metrics["built"] = built
    metrics["not_buildable"] = notes
    return StageResult(metrics=metrics, artifacts=artifacts,
                       note="; ".join([f"built {', '.join(built)} plan(s) on {gpu[0]}", *notes]))
