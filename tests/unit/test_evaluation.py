"""Held-out-phrasing fact accuracy: scoring per language and the per-fact table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.buildsys.config import EvalSection
from toolkit.datasets.records import Example
from toolkit.errors import DataError
from toolkit.quality.retention import retention_questions
from toolkit.quality.scoring import (
    DEMO_HELDOUT_FACTS,
    evaluation_prompts,
    evaluation_questions,
    fact_accuracy,
    fact_rows,
    heldout_paths,
    heldout_questions,
    outcomes,
    set_accuracies,
    write_fact_table,
)


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


def test_prompts_are_the_test_questions_then_the_general_set() -> None:
    prompts = evaluation_prompts(TEST)
    assert prompts[0] == [{"role": "user", "content": "How much is the AirWave Pro?"}]
    general = json.loads((Path(__file__).parents[2] / "toolkit/datasets/general_questions.json").read_text())
    asked = [p[0]["content"] for p in prompts[len(TEST):]]
    assert asked == retention_questions() + [q["question"] for q in general["questions"]]
    assert len(asked) == 12 + 59


def test_heldout_questions_are_read_and_scored_per_set_and_language(tmp_path: Path) -> None:
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"group": "price/en", "lang": "en", "question": "Price of the AirWave?", "facts": ["$199"]},
        {"question": "耳机保修多久？", "facts": ["24个月"]},  # language from the text
    ]) + "\n", encoding="utf-8")
    questions = evaluation_questions(TEST, [path])
    assert [q.set for q in questions[:6]] == ["test"] * 4 + ["heldout"] * 2
    assert [q.language for q in questions[4:6]] == ["en", "zh"]
    answers = ["$199", "12 months", "24 个月", "hi", "It is $199.", "不知道"] + ["paris"] * 71
    scores = set_accuracies(questions, answers)
    assert (scores["test_en"].correct, scores["test_en"].total) == (1, 2)  # the fact-less question is not scored
    assert (scores["test_zh"].correct, scores["heldout_en"].correct, scores["heldout_zh"].correct) == (1, 1, 0)
    assert (scores["general"].correct, scores["general"].total) == (1, 71)  # "paris" answers the France question only
    assert (scores["retention12"].correct, scores["retention12"].total) == (1, 12)
    assert outcomes(questions, answers, ["test", "heldout"]) == [True, False, True, True, False]


@pytest.mark.parametrize("line, message", [
    ('{"question": "Price?"}', "needs 'question' and 'facts'"),
    ('{"question": "Price?", "facts": []}', "at least one fact"),
    ("not json", "needs 'question' and 'facts'"),
])
def test_a_bad_heldout_file_names_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "Hours?", "facts": ["9:00"]}\n' + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        heldout_questions([path])
    with pytest.raises(DataError, match="does not exist"):
        heldout_questions([tmp_path / "missing.jsonl"])


def test_the_demo_heldout_set_is_used_only_with_the_demo_dataset() -> None:
    cfg = EvalSection()
    assert heldout_paths(cfg, demo_dataset=True) == [DEMO_HELDOUT_FACTS]
    assert heldout_paths(cfg, demo_dataset=False) == []
    assert heldout_paths(EvalSection(heldout_facts=[]), demo_dataset=True) == []
    assert len(heldout_questions([DEMO_HELDOUT_FACTS])) == 336
