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

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ServingError, StageError
from toolkit.pipeline import StageContext, StageRecord, StageResult
from toolkit.triton_config import LMInfo
from toolkit.workspace import atomic_write_json, run_tool

PLAN_FILE = "model.plan"
PLAN_META = "plan_meta.json"
BUILD_SCRIPT = "build_plan.sh"
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


def trt_version_from_tag(tag: str | int) -> str:
    """``100300`` (trtexec's ``[TensorRT v100300]``) -> ``10.3.0``; 8.x tags are ``8601`` -> ``8.6.1``."""
    n = int(tag)
    if n >= 10000:
        return f"{n // 10000}.{n // 100 % 100}.{n % 100}"
    return f"{n // 1000}.{n // 100 % 10}.{n % 100}"


def gpu_facts() -> tuple[str, str] | None:
    """(GPU name, compute capability) of GPU 0 from nvidia-smi; None without a working GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    line = out.strip().splitlines()[0] if out.strip() else ""
    if "," not in line:
        return None
    name, cap = (part.strip() for part in line.rsplit(",", 1))
    return name, cap


def _sm(compute_capability: str) -> str:
    return "sm_" + compute_capability.replace(".", "")


def normalise_plan_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    """plan_meta.json as written by the stage or by build_plan.sh -> version, GPU, capability."""
    version = meta.get("tensorrt_version") or (trt_version_from_tag(meta["tensorrt_tag"])
                                               if meta.get("tensorrt_tag") else "")
    return {"tensorrt_version": str(version), "gpu_name": str(meta.get("gpu_name", "")),
            "compute_capability": str(meta.get("compute_capability", "")),
            "build_script": str(meta.get("build_script", BUILD_SCRIPT))}


def check_plan_compat(
    plan_meta: Mapping[str, Any], runtime_trt_version: str, gpu_name: str, compute_capability: str
) -> None:
    """Refuse a plan built for another TensorRT version or GPU, with the command that rebuilds it.

    TensorRT engines are specific to the TensorRT version and to the GPU they were tuned on.
    """
    meta = normalise_plan_meta(plan_meta)
    same_trt = meta["tensorrt_version"] == runtime_trt_version
    same_gpu = meta["gpu_name"] == gpu_name and meta["compute_capability"] == compute_capability
    if same_trt and same_gpu:
        return
    raise ServingError(
        f"plan built for TensorRT {meta['tensorrt_version'] or '?'} on {meta['gpu_name'] or '?'} "
        f"{_sm(meta['compute_capability'] or '?')}; this server has TensorRT {runtime_trt_version} on {gpu_name} "
        f"{_sm(compute_capability)}; rebuild with {meta['build_script']}"
    )


def load_plan_meta(version_dir: Path) -> dict[str, str]:
    """The normalised plan_meta.json beside a plan."""
    path = version_dir / PLAN_META
    try:
        return normalise_plan_meta(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ServingError(f"{path} missing: rebuild the plan with its {BUILD_SCRIPT}") from None


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
