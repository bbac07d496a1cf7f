"""TensorRT plans of the KV-cache graph: the optimization profile, the ``trtexec`` command, ``build_plan.sh``.

FP16 is built from the FP32 KV-cache ONNX with ``--fp16``; INT8 from the quantize stage's Q/DQ
ONNX with ``--fp16 --int8`` (explicit quantization: TensorRT's implicit INT8 calibrators are
deprecated), and only when that graph passed the quantize stage's task-quality gate
(:func:`int8_plan_source`).

The default Q/DQ graph is weight-only: INT8 weights, a per-output-channel DequantizeLinear on each
weight, no Q/DQ on activations, which ``--fp16`` lets TensorRT run in FP16. What TensorRT's
documentation says about such a graph (TensorRT 10 developer guide, "Working with Quantized Types"):
"Explicit Quantization / Quantized Weights" accepts weights stored in a low-precision type (INT8
among them) and requires "an IDequantizeLayer ... between the weights and the linear operator that
uses them" -- which is this graph. Its weight-only GEMM kernels (low-precision weights dequantized
inside a high-precision GEMM, "WoQ") are documented for INT4 block quantization: the 10.x pages list
"INT4 (signed 4-bit integer, weight-only quantization)" and say "TensorRT quantizes activations and
weights for INT8 ... Weight-only quantization is supported for INT4". So the documentation does not
promise an INT8 weight-only GEMM kernel: TensorRT may dequantize the INT8 weights and run an FP16
GEMM. The recipe is chosen for what it keeps (it passes the task gate where static Q/DQ with MinMax
activation scales does not); its speed on a GPU has not been measured here (no TensorRT).
Every input, each ``past_key_values`` tensor included, gets ``--minShapes/--optShapes/--maxShapes``.
The tensorrt stage and the repository writer (``<model>_trt_*/build_plan.sh``) both build from here.

One optimization profile covers prefill and decode. trtexec's documented shape flags build *a*
profile (``--profile=N`` only selects one for its own inference run), and Triton's tensorrt backend
picks among several profiles only per instance group, which the generation model's BLS calls cannot
steer per request. So the single profile spans both regimes: sequence 1..max_input_len with past
0..context-1 (past length 0 is an empty tensor, which TensorRT supports), attention mask 1..context.
Kernels are tuned at the opt point, which is a decode step (sequence 1, batch
``tensorrt.opt_batch_size``, past ``max_input_len``): decode runs once per generated token, prefill
once per request.

A plan is tied to the TensorRT version and GPU it was built on: the script records them in
``plan_meta.json`` and :mod:`toolkit.repository.plan_compat` refuses a mismatch at load time.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.files import atomic_write_text
from toolkit.repository.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, LMInfo, past_names
from toolkit.repository.plan_compat import BUILD_SCRIPT, PLAN_META  # the script writes what serving checks

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
        shapes[point][INPUT_IDS] = tokens[point]
        shapes[point][ATTENTION_MASK] = mask[point]
        shapes[point][POSITION_IDS] = tokens[point]
        for name in lm.past_names():
            shapes[point][name] = past[point]
    return ShapeProfile(min=shapes["min"], opt=shapes["opt"], max=shapes["max"])


def int8_plan_source(qdq: Path | None, quantize_metrics: Mapping[str, Any]) -> tuple[Path | None, str]:
    """The quantize stage's Q/DQ graph `qdq` when it passed its task gate, else None and why not."""
    if qdq is None:
        return None, ("the quantize stage produced no Q/DQ ONNX (artifact 'qdq'); TensorRT builds INT8 only from "
                      "explicit Q/DQ quantization here")
    if not quantize_metrics.get("qdq_shipped"):
        failed = ", ".join(str(g) for g in quantize_metrics.get("qdq_failed_gates") or []) or "no gate recorded"
        return None, (f"model_qdq.onnx ({quantize_metrics.get('qdq_method', 'static Q/DQ')}) did not pass its "
                      f"task-quality gate ({failed}); see the quantize stage's report")
    return qdq, ""


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
        # INT8: FP16 for everything the graph's Q/DQ does not pin to INT8 (weight-only: the activations).
        *(["--fp16", "--int8"] if precision == "int8" else ["--fp16"]),
        f"--minShapes={shape_spec(profile.min)}",
        f"--optShapes={shape_spec(profile.opt)}",
        f"--maxShapes={shape_spec(profile.max)}",
        f"--memPoolSize=workspace:{workspace_mib}",
        "--skipInference",
    ]


# The serving image, named once: Dockerfile.triton builds FROM it (a unit test holds the two together),
# build_plan.sh says to build inside it, and the load-time check (plan_compat) compares a plan's
# plan_meta.json with the TensorRT of the server it runs in (NVIDIA's images set TRT_VERSION), so a
# plan built in this image loads in this image and is refused, with its rebuild command, anywhere else.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:26.09-py3"
TENSORRT_MAJOR = 10

_SCRIPT = """#!/usr/bin/env bash
# Builds the TensorRT {precision_upper} plan of {model} with trtexec (written by `toolkit build`).
# Needs TensorRT {trt_major} (trtexec on PATH, or TRTEXEC=/path/to/trtexec) and an NVIDIA GPU; a plan only
# runs on the TensorRT version and GPU model it was built with, so run this on the serving machine,
# inside the serving image ({triton_image}: its trtexec is /usr/src/tensorrt/bin/trtexec).
# Usage: {script} [ONNX]     (default ONNX: {default_onnx})
# One optimization profile: prefill (seq 1..{max_input_len}, past 0) and decode (seq 1,
# past 1..{max_past}), batch 1..{max_batch}, tuned at batch {opt_batch} decode.
# Writes {plan} and {meta} (TensorRT version, GPU, compute capability).
set -euo pipefail
DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
cd "$DIR"
ONNX="${{1:-{default_onnx}}}"
TRTEXEC="${{TRTEXEC:-{trtexec}}}"
{data_check}mkdir -p {plan_dir}
{command} 2>&1 | tee {log}
TRT_TAG="$(grep -o -m1 'TensorRT v[0-9]*' {log} | grep -o '[0-9]*$' || true)"
GPU="$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader | head -1)"
printf '{{"tensorrt_tag": "%s", "gpu_name": "%s", "compute_capability": "%s", "precision": "{precision}", \
"build_script": "%s"}}\\n' "$TRT_TAG" "${{GPU%%,*}}" "${{GPU##*, }}" "$DIR/{script}" > {meta}
echo "built $DIR/{plan}"
"""


def build_script(
    *, model: str, precision: str, default_onnx: str, plan: str, timing_cache: str, trtexec: str,
    profile: ShapeProfile, workspace_mib: int, external_data: Sequence[str] = (),
) -> str:
    """A standalone bash script that builds one plan; relative paths are from the script's directory.

    `external_data`: the files beside the default ONNX that hold its weights (a graph over 2 GiB); trtexec
    reads them from the graph's folder, so the script checks they are there before a long build starts.
    """
    argv = trtexec_command(trtexec="TRTEXEC_PLACEHOLDER", onnx="ONNX_PLACEHOLDER", plan=plan,
                           timing_cache=timing_cache, precision=precision, profile=profile,
                           workspace_mib=workspace_mib)
    # shlex-quote everything, then let bash expand the two variables.
    line = " \\\n  ".join(shlex.quote(a) for a in argv)
    line = line.replace("TRTEXEC_PLACEHOLDER", '"$TRTEXEC"').replace("ONNX_PLACEHOLDER", '"$ONNX"')
    line = line.replace("'--onnx=\"$ONNX\"'", '--onnx="$ONNX"')
    plan_path = Path(plan)
    return _SCRIPT.format(
        precision=precision, precision_upper=precision.upper(), model=model, script=BUILD_SCRIPT,
        default_onnx=default_onnx, max_input_len=profile.max[INPUT_IDS][1],
        max_past=profile.max[past_names(1)[0]][2], max_batch=profile.max[INPUT_IDS][0],
        opt_batch=profile.opt[INPUT_IDS][0], plan=plan, plan_dir=shlex.quote(str(plan_path.parent)),
        meta=shlex.quote(str(plan_path.with_name(PLAN_META))), log=shlex.quote(str(plan_path.with_name("trtexec.log"))),
        trtexec=trtexec, command=line, trt_major=TENSORRT_MAJOR, triton_image=TRITON_IMAGE,
        data_check=_data_check(default_onnx, external_data),
    )


def _data_check(default_onnx: str, external_data: Sequence[str]) -> str:
    if not external_data:
        return ""
    names = " ".join(shlex.quote(name) for name in external_data)
    return (f"# The default graph's weights are external data beside it ({', '.join(external_data)}); trtexec reads\n"
            "# them from the graph's folder.\n"
            f"if [ \"$ONNX\" = {shlex.quote(default_onnx)} ]; then\n"
            f"  for DATA in {names}; do\n"
            '    [ -f "$(dirname "$ONNX")/$DATA" ] || { echo "$(dirname "$ONNX")/$DATA is missing: the weights of '
            '$ONNX must be beside it" >&2; exit 1; }\n'
            "  done\n"
            "fi\n")


def write_build_script(path: Path, text: str) -> Path:
    """Write an executable script atomically (temp file + fsync + rename, mode 0755)."""
    atomic_write_text(path, text, mode=0o755)
    return path
