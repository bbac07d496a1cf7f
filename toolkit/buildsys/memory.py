"""Memory: what a stage needs for a model of a given size, what the machine has, and what a stage used.

The build refuses a stage it cannot finish before loading anything (one line: needed, available, why),
instead of being killed by the kernel halfway through a 1.5B model's export. Each stage's need is its
measured peak on real builds, written as a number of FP32 weight copies, a number of vocabulary-wide
logit tensors and a fixed part (the Python process with torch, transformers and onnxruntime loaded);
``STAGE_NEEDS`` gives them and the measurements they come from. Each stage's own peak is recorded in
its report (``peak_rss_mib``: the process's high-water mark, reset before the stage), so a new model
family can be checked against them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import StageError

GIB = 2**30
MIB = 2**20


class InsufficientMemoryError(StageError):
    """A stage would need more memory than the machine has available."""


@dataclass(frozen=True)
class ModelSize:
    """What a stage's memory depends on: parameters (all FP32 in the build) and the vocabulary."""

    params: int
    vocab: int

    @property
    def weight_bytes(self) -> int:
        return 4 * self.params

    @classmethod
    def of_dir(cls, model_dir: Path) -> ModelSize:
        """From a Hugging Face directory: safetensors headers (no weights loaded) and config.json."""
        from safetensors import safe_open

        params = 0
        for path in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="numpy") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    count = 1
                    for dim in fh.get_slice(name).get_shape():
                        count *= int(dim)
                    params += count
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config") or config
        return cls(params=params, vocab=int(text.get("vocab_size") or 0))


LOGIT_CHUNK_TOKENS = 512  # toolkit.runtime.onnx_lm.PREFILL_TOKENS: positions whose logits an onnxruntime pass returns


@dataclass(frozen=True)
class Need:
    """A stage's peak: `weight_copies` times the FP32 weights, `logit_tensors` float32 tensors of
    [LOGIT_CHUNK_TOKENS, vocabulary] (the gates' chunked prefills and scoring), plus `fixed_gib`."""

    weight_copies: float
    fixed_gib: float
    logit_tensors: int = 0

    def bytes(self, size: ModelSize) -> int:
        logits = self.logit_tensors * LOGIT_CHUNK_TOKENS * size.vocab * 4
        return int(self.weight_copies * size.weight_bytes + logits + self.fixed_gib * GIB)


# Measured peaks (peak_rss_mib in each stage's report), as copies of the FP32 weights over a fixed part of
# 1.0 GiB (Python with torch, transformers and onnxruntime loaded), rounded up by about 0.3 copies:
# - Qwen2.5-0.5B shape (1.84 GiB of weights, benchmarks/results/size-0.5b-*.md): base_model 0.68 GiB, control
#   and baseline 2.55, finetune 3.16, evaluate 2.52, merge 2.93 (copies 0.8-1.2); export_onnx 5.9 (torch.onnx's
#   leftovers, then PyTorch's and onnxruntime's decodes one after the other: 2.7 copies); quantize: GPTQ's Q/DQ
#   rounding 7.2 (3.4 copies), the FP32 and Q/DQ sessions side by side 5.3 (2.4 copies).
# - a 262,144-token vocabulary on a tiny model (Gemma 2 shape, 64 MB of weights): export_onnx 3.5 GiB, about
#   five [512, vocabulary] float tensors over the fixed part (logits, their softcap, onnxruntime's arena).
# - the 1.5B shape checks them (benchmarks/results/size-1.5b-*.md).
# Stages that load no model need only the fixed part.
STAGE_NEEDS: dict[str, Need] = {
    "base_model": Need(0.1, 1.0),
    "data": Need(0.0, 0.5),
    "control": Need(1.1, 1.5, 1),
    "baseline": Need(1.1, 1.5, 1),
    "finetune": Need(1.5, 2.0),
    "evaluate": Need(1.1, 1.5, 1),
    "merge": Need(1.4, 1.5, 1),
    "export_onnx": Need(3.0, 1.0, 5),
    "quantize": Need(2.8, 1.0, 5),
    "tensorrt": Need(0.0, 0.5),
    "repository": Need(0.1, 0.5),
    "triton_gate": Need(2.5, 1.5, 2),
}
# quantize with GPTQ rounding (the default Q/DQ recipe): its calibration session and the FP32 ModelProto it
# rounds beside the quantized one
QUANTIZE_GPTQ = Need(3.5, 1.0, 5)


def available_bytes() -> int:
    """Memory the build can still take: the kernel's MemAvailable, or less under a cgroup limit."""
    available = _meminfo("MemAvailable")
    limit, usage = _cgroup_limit()
    if limit is not None and usage is not None:
        available = min(available, max(0, limit - usage))
    return available


def check_stage(stage: str, size: ModelSize, available: int | None = None, need: Need | None = None) -> int:
    """The stage's need for a model of `size` (`need`, else its STAGE_NEEDS entry); raise InsufficientMemoryError
    in one line if the machine lacks it."""
    need = need or STAGE_NEEDS.get(stage)
    if need is None:
        return 0
    needed = need.bytes(size)
    free = available_bytes() if available is None else available
    if needed > free:
        raise InsufficientMemoryError(
            f"{stage} needs about {needed / GIB:.1f} GiB for this model ({need.weight_copies:g} x its "
            f"{size.weight_bytes / GIB:.1f} GiB of FP32 weights"
            + (f" + {need.logit_tensors} x {LOGIT_CHUNK_TOKENS * size.vocab * 4 / GIB:.2f} GiB of logits"
               if need.logit_tensors else "")
            + f" + {need.fixed_gib:g} GiB), and "
            f"{free / GIB:.1f} GiB is available; free memory or build on a machine with at least "
            f"{needed / GIB + 1:.0f} GiB")
    return needed


# --------------------------------------------------------------------------- measuring


def release_memory() -> None:
    """Give the memory an earlier stage freed back to the system: collect cycles, then glibc's malloc_trim
    (freed small and medium blocks stay in the heap otherwise: after a 0.5B model's quantize stage the
    process kept 5.6 GiB resident that no object used, which the next stage's peak and the memory guard's
    "available" both counted)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


def reset_peak() -> bool:
    """Reset this process's resident-memory high-water mark (Linux: clear_refs 5); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(pid: int | str = "self") -> int:
    """A process's resident-memory high-water mark (VmHWM), 0 where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_peak_rss_bytes(pid: int) -> int:
    """The sum of the high-water marks of `pid` and its descendants (a server and the stubs it started)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += peak_rss_bytes(current)
        todo += children.get(current, [])
    return total


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_limit() -> tuple[int | None, int | None]:
    """cgroup v2's memory.max and memory.current for this process, where a limit is set."""
    try:
        relative = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        folder = Path("/sys/fs/cgroup") / relative.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        usage = (folder / "memory.current").read_text().strip()
    except (OSError, IndexError):
        return None, None
    return (None if limit == "max" else int(limit)), int(usage)
