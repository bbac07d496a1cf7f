"""The capacity report: how much KV cache a sequence needs and how many sequences fit a memory budget.

KV cache per token = 2 (key and value) x layers x kv heads x head dim x bytes per element. A
sequence at full context holds ``context_length`` tokens of it. The budget
(``serving.memory_budget_gib``) is the model memory of one serving instance: the weights of the
served core model are subtracted first (its file size, when given), the rest holds KV cache.
Activations, the runtime and allocator slack are not counted, so treat the result as an upper
bound. Variants: fp32 (the ONNX export), fp16 (a TensorRT FP16 plan with FP16 KV I/O) and int8 KV
(a KV-cache quantization the toolkit does not ship yet, shown for planning).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from toolkit.repository.contract import LMInfo

GIB = 1024**3
MIB = 1024**2
KV_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of KV cache one token holds across all layers (key and value)."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class CapacityRow:
    kv_dtype: str
    kv_bytes_per_token: int
    kv_bytes_per_sequence: int  # at full context
    max_sequences: int  # at full context, within the budget after weights
    max_batch_kv_bytes: int  # KV of a full batch at the profile maximum (max_batch_size x context)
    max_active_kv_bytes: int  # KV of serving.max_active_sequences at full context
    max_active_fits: bool


@dataclass(frozen=True)
class CapacityReport:
    context_length: int
    memory_budget_bytes: int
    weights_bytes: int
    kv_budget_bytes: int
    max_batch_size: int
    max_active_sequences: int
    rows: list[CapacityRow]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def row(self, kv_dtype: str) -> CapacityRow:
        return next(r for r in self.rows if r.kv_dtype == kv_dtype)

    def markdown(self) -> str:
        """A table for the build report."""
        lines = [
            f"Capacity at context {self.context_length}: budget {self.memory_budget_bytes / GIB:.2f} GiB, "
            f"weights {self.weights_bytes / MIB:.0f} MiB, left for KV cache {self.kv_budget_bytes / GIB:.2f} GiB "
            "(activations and runtime not counted).",
            "",
            "| KV dtype | bytes/token | MiB/sequence (full context) | max sequences | "
            f"KV at max batch {self.max_batch_size} (MiB) | KV for {self.max_active_sequences} active (MiB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            fits = "" if r.max_active_fits else " (over budget)"
            lines.append(
                f"| {r.kv_dtype} | {r.kv_bytes_per_token} | {r.kv_bytes_per_sequence / MIB:.1f} | {r.max_sequences} | "
                f"{r.max_batch_kv_bytes / MIB:.1f} | {r.max_active_kv_bytes / MIB:.1f}{fits} |"
            )
        return "\n".join(lines) + "\n"


def capacity_report(
    lm: LMInfo, *, context_length: int, memory_budget_gib: float, weights_bytes: int = 0, max_batch_size: int = 1,
    max_active_sequences: int = 1, kv_dtypes: tuple[str, ...] = ("fp32", "fp16", "int8"),
) -> CapacityReport:
    """Capacity of `lm` at `context_length` for each KV dtype within `memory_budget_gib` minus the weights."""
    budget = int(memory_budget_gib * GIB)
    kv_budget = max(budget - weights_bytes, 0)
    rows = []
    for dtype in kv_dtypes:
        per_token = kv_bytes_per_token(lm.num_layers, lm.num_kv_heads, lm.head_dim, KV_DTYPE_BYTES[dtype])
        per_seq = per_token * context_length
        active = per_seq * max_active_sequences
        rows.append(CapacityRow(
            kv_dtype=dtype, kv_bytes_per_token=per_token, kv_bytes_per_sequence=per_seq,
            max_sequences=kv_budget // per_seq, max_batch_kv_bytes=per_seq * max_batch_size,
            max_active_kv_bytes=active, max_active_fits=active <= kv_budget,
        ))
    return CapacityReport(context_length=context_length, memory_budget_bytes=budget, weights_bytes=weights_bytes,
                          kv_budget_bytes=kv_budget, max_batch_size=max_batch_size,
                          max_active_sequences=max_active_sequences, rows=rows)
