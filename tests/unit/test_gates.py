"""The fidelity gates' arithmetic: agreement, comparable steps, logit deltas, batching, gate verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.quality.fidelity import (
    common_prefix,
    comparable_steps,
    compare_decodes,
    full_batches,
    max_abs_logit_delta,
    parity_gates,
    token_agreement,
)


def test_agreement_counts_positions_and_length_differences() -> None:
    assert token_agreement([[1, 2, 3]], [[1, 2, 3]]) == (3, 3)
    assert token_agreement([[1, 2, 3]], [[1, 9, 3]]) == (2, 3)
    # stopping early misses every token the reference still produced
    assert token_agreement([[1, 2, 3, 4]], [[1, 2]]) == (2, 4)
    assert token_agreement([[1]], [[1, 5, 6]]) == (1, 3)
    assert token_agreement([[], [7]], [[], [7]]) == (1, 1)


def test_agreement_needs_the_same_rows() -> None:
    with pytest.raises(ValueError, match="rows"):
        token_agreement([[1]], [[1], [2]])


def test_comparable_steps_stop_after_the_first_divergence() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    # steps 0..2 saw identical inputs (step 2 is where the argmax differs); step 3 did not
    assert comparable_steps([1, 2, 3, 5], [1, 2, 4, 5], ref_steps=4, got_steps=4) == 3
    # identical rows that stopped: every step up to the stop step counts, no more than were run
    assert comparable_steps([1, 2], [1, 2], ref_steps=3, got_steps=3) == 3
    assert comparable_steps([1, 2], [1, 2], ref_steps=2, got_steps=2) == 2
    assert comparable_steps([], [], ref_steps=1, got_steps=1) == 1


def _steps(values: list[list[float]]) -> list[np.ndarray]:
    """One [batch=1, vocab] logits array per step."""
    return [np.asarray([v], dtype=np.float32) for v in values]


def test_logit_delta_ignores_steps_after_divergence() -> None:
    ref = _steps([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    got = _steps([[0.0, 1.25], [0.0, 2.0], [100.0, 0.0]])  # step 1 flips the argmax; step 2 saw other inputs
    delta, compared = max_abs_logit_delta([[1, 0]], [[1, 1]], ref, got)
    assert compared == 2
    assert delta == pytest.approx(2.0)
    delta, compared = max_abs_logit_delta([[1]], [[1]], ref[:1], got[:1])
    assert (delta, compared) == (pytest.approx(0.25), 1)


def test_full_batches_wrap_around_so_every_prompt_runs_in_a_full_batch() -> None:
    assert full_batches(9, 8) == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 0, 1, 2, 3, 4, 5, 6]]
    assert full_batches(3, 2) == [[0, 1], [2, 0]]
    assert full_batches(4, 4) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        full_batches(0, 8)


def test_compare_decodes_per_batch_run_and_gates() -> None:
    batches = [[0, 1], [2, 0]]
    ref_tokens = [[5, 6], [7], [8, 9], [5, 6]]
    got_tokens = [[5, 6], [7], [8, 4], [5, 6]]
    two_rows = [np.zeros((2, 3), dtype=np.float32) for _ in range(3)]
    shifted = [a + 1e-4 for a in two_rows]
    res = compare_decodes(2, ref_tokens, got_tokens, [two_rows, two_rows], [shifted, shifted], batches)
    assert (res.tokens_matched, res.tokens_total) == (6, 7)
    assert res.agreement == pytest.approx(6 / 7)
    assert res.max_abs_logit_delta == pytest.approx(1e-4, rel=1e-3)
    assert res.diverged == [{"row": 2, "step": 1, "reference": [9], "candidate": [4]}]  # tokens from the divergence

    gates = parity_gates([res], min_agreement=1.0, max_logit_delta=1e-3, prefix="onnx_fp32")
    verdicts = {g.name: g.passed for g in gates}
    assert verdicts == {"onnx_fp32_batch2_greedy_agreement": False, "onnx_fp32_batch2_max_abs_logit_delta": True}
    assert all(g.blocking for g in gates)
    assert "6/7" in gates[0].detail and "row 2 step 1" in gates[0].detail

    soft = parity_gates([res], min_agreement=0.8, max_logit_delta=None, prefix="onnx_int8", blocking=False)
    assert [(g.name, g.passed, g.blocking) for g in soft] == [("onnx_int8_batch2_greedy_agreement", True, False)]
