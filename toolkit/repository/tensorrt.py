"""Stage ``tensorrt``: TensorRT FP16 and INT8 plans from the exported ONNX, built with ``trtexec``.

FP16 is built from the FP32 KV-cache ONNX with ``--fp16``; INT8 from the quantize stage's Q/DQ
ONNX with ``--int8`` (explicit quantization: TensorRT's implicit INT8 calibrators are deprecated).
Every input, each ``past_key_values`` tensor included, gets ``--minShapes/--optShapes/--maxShapes``.

One optimization profile covers prefill and decode. trtexec's documented shape flags build *a*
profile (``--profile=N`` only selects one for its own inference run), and Triton's tensorrt backend
picks among several profiles only per instance group, which the generation model's BLS calls cannot
steer per request. So the single profile spans both regimes: sequence 1..max_input_len with past
0..context-1 (past length 0 is an empty tensor, which TensorRT supports), attention mask 1..context.
Kernels are tuned at the opt point, which is a decode step (sequence 1, batch
``tensorrt.opt_batch_size``, past ``max_input_len``): decode runs once per generated token, prefill
once per request.

Where ``trtexec`` and a GPU are present the plans are built and ``plan_meta.json`` records the
TensorRT version, GPU and compute capability; :func:`check_plan_compat` refuses a plan built for
another TensorRT or GPU at load time. Elsewhere the stage is ``unavailable`` and leaves a
ready-to-run ``build_plan.sh`` per precision. No plan is ever faked.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import StageError
from toolkit.pipeline import StageContext, StageRecord, StageResult
from toolkit.repository.pbtxt import LMInfo
from toolkit.repository.plan_compat import (  # the stage writes what serving checks
    BUILD_SCRIPT,
    PLAN_FILE,
    PLAN_META,
    gpu_facts,
    trt_version_from_tag,
)
from toolkit.workspace import atomic_write_json, run_tool

TIMING_CACHE = "timing.cache"
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeProfile:
    """min / opt / max shape of every network input, in the graph's input order."""

    min: dict[str, Shape]
    opt: dict[str, Shape]
    max: dict[str, Shape]

    def as_dict(self) -> dict[str, dict[str, list[int]]]:
        return {name: {"min": list(self.min[name]), "opt": list(self.opt[name]), "max": list(self.max[name])}
                for name in self.min}


def kv_cache_profile(
    lm: LMInfo, *, max_batch: int, opt_batch: int, max_input_len: int, context_length: int
) -> ShapeProfile:
    """One profile covering prefill (seq <= max_input_len, past 0) and decode (seq 1, past <= context-1)."""
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"opt batch {opt_batch} must be within 1..{max_batch}")
    if not 1 <= max_input_len < context_length:
        raise ValueError(f"max_input_len {max_input_len} must be within 1..{context_length - 1}")
    opt_past = max_input_len  # a decode step after a long prompt
    tokens = {"min": (1, 1), "opt": (opt_batch, 1), "max": (max_batch, max_input_len)}
    mask = {"min": (1, 1), "opt": (opt_batch, opt_past + 1), "max": (max_batch, context_length)}
    heads, dim = lm.num_kv_heads, lm.head_dim
    past = {"min": (1, heads, 0, dim), "opt": (opt_batch, heads, opt_past, dim),
            "max": (max_batch, heads, context_length - 1, dim)}
    shapes: dict[str, dict[str, Shape]] = {"min": {}, "opt": {}, "max": {}}
    for point in shapes:
        shapes[point]["input_ids"] = tokens[point]
        shapes[point]["attention_mask"] = mask[point]
        shapes[point]["position_ids"] = tokens[point]
        for name in lm.past_names():
            shapes[point][name] = past[point]
    return ShapeProfile(min=shapes["min"], opt=shapes["opt"], max=shapes["max"])


def shape_spec(shapes: Mapping[str, Shape]) -> str:
    """trtexec's shape syntax: ``name:1x3x0x64,name2:...`` (it splits a pair on its last colon)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def trtexec_command(
    *, trtexec: str, onnx: str, plan: str, timing_cache: str, precision: str, profile: ShapeProfile,
    workspace_mib: int,
) -> list[str]:
    """The exact trtexec invocation that builds one plan (``--skipInference``: build only)."""
    if precision not in ("fp16", "int8"):
        raise ValueError(f"precision must be fp16 or int8, not {precision!r}")
    return [
        trtexec,
        f"--onnx={onnx}",
        f"--saveEngine={plan}",
        f"--timingCacheFile={timing_cache}",
        f"--{precision}",
        f"--minShapes={shape_spec(profile.min)}",
        f"--optShapes={shape_spec(profile.opt)}",
        f"--maxShapes={shape_spec(profile.max)}",
        f"--memPoolSize=workspace:{workspace_mib}",
        "--skipInference",
    ]


_SCRIPT = """#!/usr/bin/env bash
# Builds the TensorRT {precision_upper} plan of {model} with trtexec (written by `toolkit build`).
# Needs TensorRT 10 (trtexec on PATH, or TRTEXEC=/path/to/trtexec) and an NVIDIA GPU; a plan only
# runs on the TensorRT version and GPU model it was built with, so run this on the serving machine.
# Usage: {script} [ONNX]     (default ONNX: {default_onnx})
# One optimization profile: prefill (seq 1..{max_input_len}, past 0) and decode (seq 1,
# past 1..{max_past}), batch 1..{max_batch}, tuned at batch {opt_batch} decode.
# Writes {plan} and {meta} (TensorRT version, GPU, compute capability).
set -euo pipefail
DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
cd "$DIR"
ONNX="${{1:-{default_onnx}}}"
TRTEXEC="${{TRTEXEC:-{trtexec}}}"
mkdir -p {plan_dir}
{command} 2>&1 | tee {log}
TRT_TAG="$(grep -o -m1 'TensorRT v[0-9]*' {log} | grep -o '[0-9]*$' || true)"
GPU="$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader | head -1)"
printf '{{"tensorrt_tag": "%s", "gpu_name": "%s", "compute_capability": "%s", "precision": "{precision}", \
"build_script": "%s"}}\\n' "$TRT_TAG" "${{GPU%%,*}}" "${{GPU##*, }}" "$DIR/{script}" > {meta}
echo "built $DIR/{plan}"
"""


def build_script(
    *, model: str, precision: str, default_onnx: str, plan: str, timing_cache: str, trtexec: str,
    profile: ShapeProfile, workspace_mib: int,
) -> str:
    """A standalone bash script that builds one plan; relative paths are from the script's directory."""
    argv = trtexec_command(trtexec="TRTEXEC_PLACEHOLDER", onnx="ONNX_PLACEHOLDER", plan=plan,
                           timing_cache=timing_cache, precision=precision, profile=profile,
                           workspace_mib=workspace_mib)
    # shlex-quote everything, then let bash expand the two variables.
    line = " \\\n  ".join(shlex.quote(a) for a in argv)
    line = line.replace("TRTEXEC_PLACEHOLDER", '"$TRTEXEC"').replace("ONNX_PLACEHOLDER", '"$ONNX"')
    line = line.replace("'--onnx=\"$ONNX\"'", '--onnx="$ONNX"')
    any_past = next(n for n in profile.max if n.startswith("past_key_values."))
    plan_path = Path(plan)
    return _SCRIPT.format(
        precision=precision, precision_upper=precision.upper(), model=model, script=BUILD_SCRIPT,
        default_onnx=default_onnx, max_input_len=profile.max["input_ids"][1],
        max_past=profile.max[any_past][2], max_batch=profile.max["input_ids"][0],
        opt_batch=profile.opt["input_ids"][0], plan=plan, plan_dir=shlex.quote(str(plan_path.parent)),
        meta=shlex.quote(str(plan_path.with_name(PLAN_META))), log=shlex.quote(str(plan_path.with_name("trtexec.log"))),
        trtexec=trtexec, command=line,
    )


def write_build_script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)
    return path


def export_onnx_path(record: StageRecord) -> Path:
    """The FP32 KV-cache ONNX the export stage recorded (artifact ``onnx``, or ``model``)."""
    for name in ("onnx", "model"):
        if name in record.artifacts:
            return record.path(name)
    raise StageError(f"stage {record.name} recorded no ONNX artifact; rerun it with --force --stages {record.name}")


def plan_sources(ctx: StageContext) -> tuple[dict[str, Path], list[str]]:
    """precision -> source ONNX, and a report line for each precision that cannot be built."""
    sources: dict[str, Path] = {}
    notes: list[str] = []
    for precision in ctx.config.tensorrt.precisions:
        if precision == "fp16":
            sources["fp16"] = export_onnx_path(ctx.inputs["export_onnx"])
            continue
        quantize = ctx.inputs.get("quantize")
        if quantize is not None and "qdq" in quantize.artifacts:
            sources["int8"] = quantize.path("qdq")
        else:
            notes.append("INT8 plan not buildable: the quantize stage produced no Q/DQ ONNX (artifact 'qdq'); "
                         "TensorRT builds INT8 only from explicit Q/DQ quantization here")
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
    lm = LMInfo.from_onnx(export_onnx_path(ctx.inputs["export_onnx"]))
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
            workspace_mib=cfg.tensorrt.workspace_mib))
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
        note = (f"{found} ({missing}) — plan build scripts written to {where}; "
                "run them on a machine with TensorRT and a GPU")
        metrics["not_buildable"] = notes
        return StageResult(status="unavailable", note=note, metrics=metrics, artifacts=artifacts)
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
