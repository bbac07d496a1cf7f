"""TensorRT plans are tied to the TensorRT version and GPU they were built on: check before serving one.

The tensorrt stage (or the ``build_plan.sh`` it writes) records ``plan_meta.json`` beside each plan.
The generation model calls :func:`verify_plan_dir` when its core model is a ``tensorrt_plan``, so a
plan built elsewhere is refused at load time with the command that rebuilds it, instead of failing
inside TensorRT's deserializer. Standard library only: this runs inside Triton's python backend.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from toolkit.errors import ServingError

PLAN_FILE = "model.plan"
PLAN_META = "plan_meta.json"
BUILD_SCRIPT = "build_plan.sh"


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


def runtime_tensorrt_version() -> str | None:
    """TensorRT version of this server: NVIDIA's containers set ``TRT_VERSION``; else the Python module."""
    version = os.environ.get("TRT_VERSION", "").strip()
    if version:
        return version
    try:
        import tensorrt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return str(tensorrt.__version__)


def verify_plan_dir(version_dir: Path) -> None:
    """Refuse to serve the plan in `version_dir` unless it was built for this TensorRT and GPU."""
    if not (version_dir / PLAN_FILE).is_file():
        raise ServingError(f"no TensorRT plan at {version_dir / PLAN_FILE}: run {version_dir.parent / BUILD_SCRIPT} "
                           "on a machine with TensorRT and this GPU")
    meta = load_plan_meta(version_dir)
    runtime = runtime_tensorrt_version()
    gpu = gpu_facts()
    if runtime is None or gpu is None:
        missing = "TensorRT" if runtime is None else "GPU (nvidia-smi found none)"
        raise ServingError(f"{version_dir / PLAN_FILE} is a TensorRT plan but this server has no {missing}; serve "
                           "the onnx_fp32 core model instead (repository.serving_precision: fp32)")
    check_plan_compat(meta, runtime, *gpu)
