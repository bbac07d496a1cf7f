"""Held-out-phrasing fact accuracy: scoring per language and the per-fact table."""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.datasets.records import Example
from toolkit.quality.retention import retention_questions
from toolkit.quality.scoring import evaluation_prompts, fact_accuracy, fact_rows, write_fact_table


def _ex(question: str, answer: str, facts: list[str], group: str) -> Example:
    return Example([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], facts,
                   group=group)


TEST = [
    _ex("How much is the AirWave Pro?", "It costs $199.", ["$199"], "airwave-price/en"),
    _ex("Warranty for speakers?", "18 months.", ["18 months"], "speaker-warranty/en"),
    _ex("耳机保修多久？", "保修24个月。", ["24个月"], "headphone-warranty/zh"),
    _ex("Say hi", "Hi!", [], "greeting/en"),  # no facts: not scored
]


def test_accuracy_is_per_language_and_before_after() -> None:
    before = ["I don't know.", "Speakers have an 18 Months warranty", "不知道", "hello"]
    after = ["The AirWave Pro costs $199", "12 months", "耳机保修 24 个月。", "Hi!"]
    rows = fact_rows(TEST, before, after)
    assert [r.language for r in rows] == ["en", "en", "zh"]
    assert fact_accuracy(rows, "en") == {"total": 2, "before": 1, "after": 1, "before_accuracy": 0.5,
                                         "after_accuracy": 0.5}
    assert fact_accuracy(rows, "zh")["after_accuracy"] == 1.0  # whitespace and case do not matter
    assert fact_accuracy(rows)["total"] == 3


def test_fact_table_lists_every_question_with_both_answers(tmp_path: Path) -> None:
    rows = fact_rows(TEST, ["a", "b", "c", "d"], ["$199 | yes", "x", "24个月", "y"])
    write_fact_table(rows, tmp_path / "facts.jsonl", tmp_path / "facts.md")
    lines = [json.loads(line) for line in (tmp_path / "facts.jsonl").read_text().splitlines()]
    assert [line["group"] for line in lines] == ["airwave-price/en", "speaker-warranty/en", "headphone-warranty/zh"]
    md = (tmp_path / "facts.md").read_text()
    assert "## en: 0/2 before → 1/2 after" in md and "## zh: 0/1 before → 1/1 after" in md
    assert "$199 \\| yes" in md  # pipes escaped inside table cells


def test_prompts_are_the_test_questions_then_the_retention_set() -> None:
    prompts = evaluation_prompts(TEST)
    assert prompts[0] == [{"role": "user", "content": "How much is the AirWave Pro?"}]
    assert [p[0]["content"] for p in prompts[len(TEST):]] == retention_questions()
