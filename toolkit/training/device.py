"""Where and in which precision the fine-tune runs: ``train.device`` and ``train.precision``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(setting: str) -> torch.device:
    """``train.device``: auto picks CUDA when torch sees a GPU; asking for CUDA without one is an error."""
    import torch

    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda, but torch sees no CUDA GPU (torch.version.cuda="
                              f"{torch.version.cuda}); install a CUDA torch (README: set-up) or use train.device: cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_amx() -> bool:
    """True when the CPU has AMX bf16 tiles (Sapphire Rapids and later), where bf16 matmuls are fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """How a training forward runs: autocast dtype (None: fp32) and whether the loss needs a scaler."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: bool

    @classmethod
    def choose(cls, device: torch.device, precision: str) -> Precision:
        """``train.precision``: bf16 autocast where it is fast, fp16 with a loss scaler on GPUs without bf16.

        auto means bf16 on GPUs and on CPUs with AMX tiles, fp32 on other CPUs (bf16 autocast without
        AMX is emulated and slower than fp32).
        """
        import torch

        if precision == "auto" and device.type == "cpu":
            precision = "bf16" if cpu_has_amx() else "fp32"
        if precision == "fp32":
            return cls(device, None, False)
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return cls(device, torch.float16, True)
        return cls(device, torch.bfloat16, False)

    def autocast(self) -> Any:
        import torch

        return torch.autocast(device_type=self.device.type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    @property
    def label(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.")
