"""Scoring a model on the build's questions: held-out facts and general knowledge.

Three sets, asked together in one generation pass (:func:`evaluation_questions`):

- ``test``: for every taught fact with enough phrasings, one phrasing that training never saw
  (``toolkit.datasets.records.split_by_phrasing``): 56 English and 56 Chinese questions in the demo build;
- ``heldout``: fact questions written apart from the dataset (``eval.heldout_facts``; for the demo
  dataset ``toolkit/datasets/demo_facts_heldout.jsonl``, 168 a language), never trained on;
- ``general``: 71 general-knowledge questions (the 12 of :mod:`toolkit.quality.retention` and the 59 of
  ``toolkit/datasets/general_questions.json``), none among the control prompts the fine-tune trains on.

A fact answer is right when it contains every one of the question's ``facts`` strings (NFKC,
case-folded, whitespace removed on both sides: :func:`toolkit.quality.textmetrics.contains_facts`), per
language (``zh`` when the question has a CJK ideograph, else ``en``); a general answer when it
contains an accepted answer (:func:`toolkit.quality.retention.is_accepted`). Accuracies carry 95 % intervals
and comparisons a paired rule (:mod:`toolkit.quality.significance`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolkit.buildsys.config import EvalSection
from toolkit.datasets.records import DATASETS_DIR, Example, is_chinese, language_of
from toolkit.errors import DataError
from toolkit.model_io.modeling import Messages, generate_replies
from toolkit.quality.retention import RETENTION_SET, is_accepted
from toolkit.quality.significance import Accuracy, accuracy
from toolkit.quality.textmetrics import contains_facts

LANGUAGES = ("en", "zh")
DEMO_HELDOUT_FACTS = DATASETS_DIR / "demo_facts_heldout.jsonl"
GENERAL_QUESTIONS = DATASETS_DIR / "general_questions.json"
CORE_RETENTION = "retention"  # the group of the 12 original retention questions within the general set


@dataclass(frozen=True)
class Question:
    """One question of an evaluation set and what a right answer must contain."""

    set: str  # "test", "heldout" or "general"
    prompt: Messages
    facts: tuple[str, ...] = ()
    accepted: tuple[str, ...] = ()
    language: str = "en"
    group: str = ""

    @property
    def text(self) -> str:
        return self.prompt[-1]["content"]

    def right(self, answer: str) -> bool | None:
        """Whether `answer` is right; None for a test question without facts (nothing to check)."""
        if self.set == "general":
            return is_accepted(answer, self.accepted)
        return contains_facts(answer, list(self.facts)) if self.facts else None


def test_questions(test: Sequence[Example]) -> list[Question]:
    return [Question("test", ex.prompt, tuple(ex.facts), language=language_of(ex), group=ex.group or ex.answer[:40])
            for ex in test]


def heldout_questions(paths: Iterable[Path]) -> list[Question]:
    """Fact questions from JSON Lines files: ``{"question", "facts", "group"?, "lang"?}`` a line."""
    out = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"eval.heldout_facts: {path} does not exist")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, facts = str(row["question"]), [str(f) for f in row["facts"]]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{number}: a held-out question needs 'question' and 'facts' ({err})") from None
            if not facts:
                raise DataError(f"{path}:{number}: a held-out question needs at least one fact string")
            language = row.get("lang") or ("zh" if is_chinese(question) else "en")
            out.append(Question("heldout", [{"role": "user", "content": question}], tuple(facts),
                                language=language, group=str(row.get("group", ""))))
    return out


def general_questions() -> list[Question]:
    """The 12 retention questions, then the 59 of ``general_questions.json``."""
    rows = json.loads(GENERAL_QUESTIONS.read_text(encoding="utf-8"))["questions"]
    items = [(item.question, item.accepted, CORE_RETENTION) for item in RETENTION_SET]
    items += [(row["question"], tuple(row["accepted"]), "general") for row in rows]
    return [Question("general", [{"role": "user", "content": q}], accepted=tuple(a),
                     language="zh" if is_chinese(q) else "en", group=g) for q, a, g in items]


def heldout_paths(cfg: EvalSection, demo_dataset: bool) -> list[Path]:
    """The held-out fact files: ``eval.heldout_facts``, or the demo one when the build uses the demo dataset."""
    if cfg.heldout_facts is not None:
        return list(cfg.heldout_facts)
    return [DEMO_HELDOUT_FACTS] if demo_dataset else []


def evaluation_questions(test: Sequence[Example], heldout: Sequence[Path] = ()) -> list[Question]:
    """Every question a model is scored on, in the order answers are stored: test, held-out, general."""
    return [*test_questions(test), *heldout_questions(heldout), *general_questions()]


def evaluation_prompts(test: Sequence[Example]) -> list[Messages]:
    """The test questions, then the general questions (the base model's "before" set: no held-out facts)."""
    return [q.prompt for q in evaluation_questions(test)]


def outcomes(questions: Sequence[Question], answers: Sequence[str], sets: Sequence[str],
             language: str | None = None, group: str | None = None) -> list[bool]:
    """Right/wrong per question of the given sets (and language, group), in order; questions without facts left out."""
    out = []
    for q, answer in zip(questions, answers, strict=True):
        if q.set in sets and (language is None or q.language == language) and (group is None or q.group == group):
            right = q.right(answer)
            if right is not None:
                out.append(right)
    return out


def set_accuracies(questions: Sequence[Question], answers: Sequence[str]) -> dict[str, Accuracy]:
    """Accuracy with its 95 % interval per set and language: ``test_en``, ``heldout_zh``, ``general``,
    ``retention12``; sets with no question are left out."""
    out = {}
    for name in ("test", "heldout"):
        for language in LANGUAGES:
            picked = outcomes(questions, answers, [name], language)
            if picked:
                out[f"{name}_{language}"] = accuracy(picked)
    general = outcomes(questions, answers, ["general"])
    if general:
        out["general"] = accuracy(general)
        out["retention12"] = accuracy(outcomes(questions, answers, ["general"], group=CORE_RETENTION))
    return out


def answer_prompts(model: Any, tokenizer: Any, prompts: Sequence[Messages], cfg: EvalSection) -> list[str]:
    """Greedy answers in the prompts' order; prompts of similar length share a batch (less padding)."""
    order = sorted(range(len(prompts)), key=lambda i: sum(len(m["content"]) for m in prompts[i]))
    answers = generate_replies(model, tokenizer, [prompts[i] for i in order], max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.batch_size)
    out = [""] * len(prompts)
    for i, answer in zip(order, answers, strict=True):
        out[i] = answer
    return out


@dataclass(frozen=True)
class FactRow:
    """One held-out question with facts: what it asks, and both models' answers."""

    group: str
    language: str
    question: str
    facts: list[str]
    before: str
    before_ok: bool
    after: str
    after_ok: bool
    source: str


def fact_rows(test: Sequence[Example], before: Sequence[str], after: Sequence[str]) -> list[FactRow]:
    rows = []
    for ex, b, a in zip(test, before, after, strict=False):
        if ex.facts:
            rows.append(FactRow(
                group=ex.group or ex.answer[:40], language=language_of(ex), question=ex.prompt[-1]["content"],
                facts=list(ex.facts), before=b, before_ok=contains_facts(b, ex.facts), after=a,
                after_ok=contains_facts(a, ex.facts), source=ex.source,
            ))
    return rows


def fact_accuracy(rows: Sequence[FactRow], language: str | None = None) -> dict[str, Any]:
    """Correct/total before and after, for one language (or all)."""
    picked = [r for r in rows if language is None or r.language == language]
    total = len(picked)
    before = sum(r.before_ok for r in picked)
    after = sum(r.after_ok for r in picked)
    return {"total": total, "before": before, "after": after,
            "before_accuracy": round(before / total, 4) if total else None,
            "after_accuracy": round(after / total, 4) if total else None}


def _cell(text: str, width: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def write_fact_table(rows: Sequence[FactRow], jsonl: Path, markdown: Path) -> None:
    """Every held-out question with its facts and both answers: JSON Lines, and a Markdown table per language."""
    with jsonl.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
    lines = ["# Held-out-phrasing fact accuracy", "",
             "One question per taught fact, phrased as training never phrased it. ✓ = the answer contains every "
             "fact string.", ""]
    for language in LANGUAGES:
        acc = fact_accuracy(rows, language)
        if not acc["total"]:
            continue
        lines += [f"## {language}: {acc['before']}/{acc['total']} before → {acc['after']}/{acc['total']} after", "",
                  "| fact | question | facts | before | after |", "|---|---|---|---|---|"]
        for r in (r for r in rows if r.language == language):
            lines.append(f"| {_cell(r.group, 30)} | {_cell(r.question, 60)} | {_cell(', '.join(r.facts), 30)} | "
                         f"{'✓' if r.before_ok else '✗'} {_cell(r.before, 50)} | "
                         f"{'✓' if r.after_ok else '✗'} {_cell(r.after, 70)} |")
        lines.append("")
    markdown.write_text("\n".join(lines), encoding="utf-8")
