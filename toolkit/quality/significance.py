"""Deciding on enough evidence: accuracies with 95 % intervals, and a paired non-inferiority rule.

Every quality gate compares two models answering the same questions (fine-tuned against base, an
INT8 graph against FP32). One answer flipping on a 12- or 56-question set moves a score by 8 or 1.8
points, and a near tie in the last bits of a CPU's arithmetic flips answers, so a gate on the raw
difference decides by chance. The rule here, for right/wrong answers paired by question:

- each accuracy is reported with its 95 % Wilson score interval (``scipy.stats.binomtest``);
- the difference (variant minus reference, in points) gets a 95 % paired bootstrap interval: the
  questions are resampled with replacement ``resamples`` times from a fixed seed, so the decision is
  the same on every machine for the same answers;
- the variant passes when the interval's lower end is above ``-margin`` points: the data rule out
  a loss bigger than the margin (a non-inferiority test at the 2.5 % level);
- McNemar's exact test (two-sided, on the questions only one side got right) is reported beside it,
  saying whether the variant differs significantly at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 20261205


@dataclass(frozen=True)
class Accuracy:
    """k right of n, with the 95 % Wilson interval."""

    correct: int
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def text(self) -> str:
        return f"{self.correct}/{self.total} ({self.value:.2f}, 95% CI {self.low:.2f}-{self.high:.2f})"


def accuracy(outcomes: Sequence[bool]) -> Accuracy:
    """The share of True in `outcomes`, with its 95 % Wilson score interval."""
    from scipy.stats import binomtest

    n, k = len(outcomes), int(sum(bool(o) for o in outcomes))
    if not n:
        return Accuracy(0, 0, 0.0, 1.0)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return Accuracy(k, n, round(float(ci.low), 4), round(float(ci.high), 4))


@dataclass(frozen=True)
class PairedDecision:
    """Variant against reference on the same questions: the rule's inputs, numbers and outcome."""

    passed: bool
    questions: int
    reference_correct: int
    variant_correct: int
    gained: int  # right in the variant only
    lost: int  # right in the reference only
    diff_points: float
    low_points: float
    high_points: float
    margin_points: float
    mcnemar_p: float
    seed: int
    resamples: int

    def text(self) -> str:
        return (f"{self.variant_correct}/{self.questions} vs {self.reference_correct}/{self.questions} "
                f"({self.diff_points:+.1f} points, 95% paired-bootstrap CI {self.low_points:+.1f} to "
                f"{self.high_points:+.1f}; {self.gained} gained, {self.lost} lost, McNemar p={self.mcnemar_p:.2g}); "
                f"{'passes' if self.passed else 'fails'}: lower end {'above' if self.passed else 'at or below'} "
                f"-{self.margin_points:g} points")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: is the split of the discordant questions unlike a fair coin's?"""
    from scipy.stats import binomtest

    if gained + lost == 0:
        return 1.0
    return float(binomtest(gained, gained + lost, 0.5).pvalue)


def not_worse(
    reference: Sequence[bool], variant: Sequence[bool], margin_points: float,
    seed: int = DEFAULT_SEED, resamples: int = DEFAULT_RESAMPLES,
) -> PairedDecision:
    """Does `variant` answer the questions not worse than `reference` by more than `margin_points`?

    Both are right/wrong per question, in the same order. Passes when the lower end of the 95 %
    paired-bootstrap interval of (variant - reference) accuracy, in points, is above -margin.
    """
    import numpy as np

    if len(reference) != len(variant):
        raise ValueError(f"{len(variant)} variant answers for {len(reference)} reference answers")
    if not reference:
        raise ValueError("no questions to compare on")
    a = np.asarray(reference, dtype=np.int8)
    b = np.asarray(variant, dtype=np.int8)
    diff = (b - a).astype(np.float64)
    n = len(diff)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: bounded memory for large sets
        count = min(1000, resamples - start)
        means[start: start + count] = diff[rng.integers(0, n, size=(count, n))].mean(axis=1)
    low, high = (float(x) * 100 for x in np.percentile(means, [2.5, 97.5]))
    gained, lost = int(((b == 1) & (a == 0)).sum()), int(((a == 1) & (b == 0)).sum())
    return PairedDecision(
        passed=low > -margin_points, questions=n, reference_correct=int(a.sum()), variant_correct=int(b.sum()),
        gained=gained, lost=lost, diff_points=round(float(diff.mean()) * 100, 2), low_points=round(low, 2),
        high_points=round(high, 2), margin_points=margin_points, mcnemar_p=round(mcnemar_p(gained, lost), 4),
        seed=seed, resamples=resamples,
    )
