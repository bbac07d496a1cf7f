"""The statistical rule of the quality gates, on synthetic answers with known properties."""

from __future__ import annotations

import random

import pytest

from toolkit.quality.significance import accuracy, mcnemar_p, not_worse


def _answers(n: int, right: int, seed: int) -> list[bool]:
    out = [True] * right + [False] * (n - right)
    random.Random(seed).shuffle(out)
    return out


def test_wilson_interval_matches_the_textbook_formula() -> None:
    # Wilson score interval for 40/100 by hand: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964
    z, n, p = 1.959964, 100, 0.4
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    acc = accuracy([True] * 40 + [False] * 60)
    assert (acc.correct, acc.total) == (40, 100)
    assert acc.low == pytest.approx(centre - half, abs=1e-4) and acc.high == pytest.approx(centre + half, abs=1e-4)
    assert accuracy([]).total == 0


def test_an_identical_variant_passes() -> None:
    reference = _answers(448, 200, 1)
    decision = not_worse(reference, list(reference), margin_points=3.0)
    assert decision.passed and decision.diff_points == 0 and decision.low_points == 0 and decision.mcnemar_p == 1.0


def test_a_variant_five_points_worse_fails() -> None:
    reference = _answers(448, 224, 2)
    variant = list(reference)
    rights = [i for i, ok in enumerate(reference) if ok]
    for i in random.Random(3).sample(rights, 22):  # 22 of 448 right answers lost: 4.9 points
        variant[i] = False
    decision = not_worse(reference, variant, margin_points=3.0)
    assert not decision.passed
    assert decision.lost == 22 and decision.gained == 0 and decision.diff_points == pytest.approx(-4.91, abs=0.01)
    assert decision.low_points < -5 < decision.high_points < 0
    assert decision.mcnemar_p < 1e-5  # 22 against 0: a fair coin gives that with p = 2 * 0.5**22


def test_noise_without_a_loss_passes_and_the_decision_is_reproducible() -> None:
    reference = _answers(448, 224, 4)
    variant = list(reference)
    flips = random.Random(5).sample(range(448), 20)  # 20 answers flip either way: no systematic loss
    for i in flips:
        variant[i] = not variant[i]
    first = not_worse(reference, variant, margin_points=3.0, seed=7)
    assert first.passed and first.gained + first.lost == 20
    assert first == not_worse(reference, variant, margin_points=3.0, seed=7)
    assert 0.05 < mcnemar_p(first.gained, first.lost) <= 1


def test_mismatched_or_empty_answer_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="3 variant answers for 2"):
        not_worse([True, False], [True, True, False], 3.0)
    with pytest.raises(ValueError, match="no questions"):
        not_worse([], [], 3.0)
