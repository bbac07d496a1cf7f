"""The capacity report, checked by hand on SmolLM2-135M's shape (30 layers, 3 kv heads, head dim 64)."""

from __future__ import annotations

from toolkit.repository.capacity import GIB, MIB, capacity_report, kv_bytes_per_token
from toolkit.repository.contract import LMInfo

SMOLLM2 = LMInfo(num_layers=30, num_kv_heads=3, head_dim=64, vocab_size=49152)
WEIGHTS = 539_285_833  # the FP32 ONNX export, bytes


def test_kv_bytes_per_token() -> None:
    assert kv_bytes_per_token(30, 3, 64, 4) == 46_080  # 2 x 30 x 3 x 64 x 4


def test_smollm2_at_context_2048_in_4_gib() -> None:
    report = capacity_report(SMOLLM2, context_length=2048, memory_budget_gib=4.0, weights_bytes=WEIGHTS,
                             max_batch_size=8, max_active_sequences=48)
    assert report.kv_budget_bytes == 4 * GIB - WEIGHTS
    fp32, fp16, int8 = report.row("fp32"), report.row("fp16"), report.row("int8")
    assert fp32.kv_bytes_per_sequence == 90 * MIB and fp16.kv_bytes_per_sequence == 45 * MIB
    assert int8.kv_bytes_per_token == 11_520
    # (4 GiB - 514.3 MiB) / 90 MiB = 39.8 -> 39 sequences; halving the KV dtype doubles it (rounded down).
    assert (fp32.max_sequences, fp16.max_sequences, int8.max_sequences) == (39, 79, 159)
    assert fp32.max_batch_kv_bytes == 8 * 90 * MIB
    assert not fp32.max_active_fits and fp16.max_active_fits  # 48 x 90 MiB > 3.5 GiB; 48 x 45 MiB fits
    table = report.markdown()
    assert "| fp32 | 46080 | 90.0 | 39 | 720.0 | 4320.0 (over budget) |" in table


def test_weights_larger_than_budget_leave_no_sequences() -> None:
    report = capacity_report(SMOLLM2, context_length=2048, memory_budget_gib=0.25, weights_bytes=WEIGHTS)
    assert report.kv_budget_bytes == 0 and all(r.max_sequences == 0 for r in report.rows)
