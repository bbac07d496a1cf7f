"""A fixed general-knowledge retention set: does the fine-tuned model still know what it knew?

Each question has accepted answers; an answer is right when one of them appears in it as a whole
token sequence (CJK-aware tokens from :mod:`toolkit.quality.textmetrics`, so "7" does not match "17" and
"北京" matches inside a Chinese sentence). The questions are easy ones the base SmolLM2-135M
answers correctly (measured: 12/12 greedy; it cannot answer Chinese knowledge questions such as
"中国的首都是哪里？" at all, so the Chinese item is arithmetic), and none appears among the
control prompts used for self-distillation (``toolkit/datasets/control_prompts.json``), so the
score measures retention, not memorisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from toolkit.quality.textmetrics import tokenize


@dataclass(frozen=True)
class RetentionItem:
    question: str
    accepted: tuple[str, ...]


RETENTION_SET: tuple[RetentionItem, ...] = (
    RetentionItem("What is the capital of France?", ("paris",)),
    RetentionItem("How many days are in a week?", ("7", "seven")),
    RetentionItem("What color is the sky on a clear day?", ("blue",)),
    RetentionItem("Who wrote Romeo and Juliet?", ("shakespeare",)),
    RetentionItem("What is the chemical formula for water?", ("h2o",)),
    RetentionItem("What is the boiling point of water in degrees Celsius?", ("100", "one hundred")),
    RetentionItem("What is the opposite of hot?", ("cold",)),
    RetentionItem("What is the capital of Japan?", ("tokyo",)),
    RetentionItem("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    RetentionItem("What is 2 plus 2?", ("4", "four")),
    RetentionItem("What is the capital of China?", ("beijing", "北京")),
    RetentionItem("1加1等于几？", ("2", "二", "两")),
)


def retention_questions() -> list[str]:
    """The questions, in the order :func:`score_retention` expects the answers."""
    return [item.question for item in RETENTION_SET]


def is_accepted(answer: str, accepted: Sequence[str]) -> bool:
    """True when any accepted answer occurs in `answer` as a contiguous token sequence."""
    tokens = tokenize(answer)
    for option in accepted:
        want = tokenize(option)
        n = len(want)
        if n and any(tokens[i : i + n] == want for i in range(len(tokens) - n + 1)):
            return True
    return False


@dataclass(frozen=True)
class RetentionResult:
    score: float
    correct: int
    total: int
    per_question: list[dict[str, object]] = field(default_factory=list)


def score_retention(answers: Sequence[str], items: Sequence[RetentionItem] = RETENTION_SET) -> RetentionResult:
    """Score answers (one per item, same order) by accepted keywords; per-question detail included."""
    if len(answers) != len(items):
        raise ValueError(f"{len(answers)} answers for {len(items)} retention questions")
    detail = [
        {"question": item.question, "answer": answer, "correct": is_accepted(answer, item.accepted)}
        for item, answer in zip(items, answers, strict=True)
    ]
    correct = sum(1 for d in detail if d["correct"])
    return RetentionResult(score=correct / len(items) if items else 0.0, correct=correct, total=len(items),
                           per_question=detail)
