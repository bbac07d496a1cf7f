"""Scoring a model on the build's held-out questions.

The test split holds, for every taught fact with enough phrasings, one phrasing that training never
saw (``toolkit.dataset.split_by_phrasing``). An answer is right when it contains every one of the
example's ``facts`` strings (NFKC, case-folded, whitespace removed on both sides:
:func:`toolkit.textmetrics.contains_facts`). Held-out-phrasing fact accuracy is the share of test
examples with facts answered right, per language (``zh`` when the question has a CJK ideograph,
else ``en``). BLEU-4 and ROUGE-L compare the answers with the reference answers; retention asks
the fixed general-knowledge set (:mod:`toolkit.retention`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolkit.buildsys.config import EvalSection
from toolkit.datasets.records import Example, language_of
from toolkit.model_io.modeling import Messages, generate_replies
from toolkit.quality.retention import retention_questions
from toolkit.quality.textmetrics import contains_facts

LANGUAGES = ("en", "zh")


def evaluation_prompts(test: Sequence[Example]) -> list[Messages]:
    """The test questions, then the retention questions: one generation pass answers both."""
    return [ex.prompt for ex in test] + [[{"role": "user", "content": q}] for q in retention_questions()]


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
