"""Stage ``evaluate``: did fine-tuning teach the facts, and did the model keep what it knew?

"Before" is the base model's answers from the ``baseline`` stage; "after" is the base model with the
LoRA adapter (unmerged: the merge stage proves the merged weights behave the same), answering the
same prompts. Reported: held-out-phrasing fact accuracy per language (see :mod:`toolkit.evaluation`),
BLEU-4, ROUGE-L and fact exact match over the whole test split, and general-knowledge retention, which
gates the build: an adapter that makes the model forget what it knew fails here rather than in
production. ``facts.md``/``facts.jsonl`` list every held-out question with both answers.
"""

from __future__ import annotations

import json
import time
from typing import Any

from toolkit.buildsys.report import GateResult
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.datasets.records import read_records, read_split
from toolkit.errors import StageError
from toolkit.model_io.modeling import CHAT_TEMPLATE_FILE, load_model, load_tokenizer
from toolkit.quality.retention import score_retention
from toolkit.quality.scoring import (
    LANGUAGES,
    answer_prompts,
    evaluation_prompts,
    fact_accuracy,
    fact_rows,
    write_fact_table,
)
from toolkit.quality.textmetrics import score_answers

SAMPLES_FILE = "samples.jsonl"
RETENTION_FILE = "retention.jsonl"
FACTS_JSONL = "facts.jsonl"
FACTS_MD = "facts.md"


def run(ctx: StageContext) -> StageResult:
    """Score the fine-tuned model against the base model's answers; gate on retention."""
    from peft import PeftModel

    cfg = ctx.config.eval
    adapter_dir = ctx.inputs["finetune"].path("adapter")
    tokenizer = load_tokenizer(adapter_dir)
    tokenizer.chat_template = (adapter_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    test = read_split(ctx.inputs["data"].dir, "test")[: cfg.max_examples]
    prompts = evaluation_prompts(test)
    before = [row["answer"] for row in read_records(ctx.inputs["baseline"].path("answers"))]
    if len(before) != len(prompts):
        raise StageError(f"the baseline stage answered {len(before)} prompts, not {len(prompts)}; "
                         "rerun with --force --stages baseline")

    started = time.perf_counter()
    tuned = PeftModel.from_pretrained(load_model(ctx.inputs["base_model"].path("model")), str(adapter_dir))
    tuned.eval()
    after = answer_prompts(tuned, tokenizer, prompts, cfg)
    generate_s = time.perf_counter() - started

    n = len(test)
    references, facts = [ex.answer for ex in test], [ex.facts for ex in test]
    scores_before = score_answers(before[:n], references, facts)
    scores_after = score_answers(after[:n], references, facts)
    kept_before, kept_after = score_retention(before[n:]), score_retention(after[n:])
    rows = fact_rows(test, before[:n], after[:n])
    write_fact_table(rows, ctx.out_dir / FACTS_JSONL, ctx.out_dir / FACTS_MD)

    with (ctx.out_dir / SAMPLES_FILE).open("w", encoding="utf-8") as fh:
        for ex, b, a in zip(test, before, after, strict=False):
            fh.write(json.dumps({"question": ex.prompt[-1]["content"], "reference": ex.answer, "facts": ex.facts,
                                 "before": b, "after": a, "source": ex.source}, ensure_ascii=False) + "\n")
    with (ctx.out_dir / RETENTION_FILE).open("w", encoding="utf-8") as fh:
        for b_row, a_row in zip(kept_before.per_question, kept_after.per_question, strict=True):
            fh.write(json.dumps({"question": a_row["question"], "before": b_row["answer"],
                                 "before_correct": b_row["correct"], "after": a_row["answer"],
                                 "after_correct": a_row["correct"]}, ensure_ascii=False) + "\n")

    gate = GateResult(
        name="retention", passed=kept_after.score >= cfg.min_retention, value=round(kept_after.score, 4),
        threshold=cfg.min_retention,
        detail=f"{kept_after.correct}/{kept_after.total} general questions right after fine-tuning "
               f"({kept_before.correct}/{kept_before.total} before); see {RETENTION_FILE}",
    )
    metrics: dict[str, Any] = {"test_examples": n, "test_examples_with_facts": scores_after.examples_with_facts}
    for language in LANGUAGES:
        acc = fact_accuracy(rows, language)
        metrics[f"fact_accuracy_{language}_before"] = acc["before_accuracy"]
        metrics[f"fact_accuracy_{language}_after"] = acc["after_accuracy"]
        metrics[f"fact_questions_{language}"] = acc["total"]
    for name, scores in (("before", scores_before), ("after", scores_after)):
        for key in ("bleu4", "rouge_l", "fact_em"):
            metrics[f"{key}_{name}"] = scores.as_dict()[key]
    metrics.update({
        "retention_before": round(kept_before.score, 4), "retention_after": round(kept_after.score, 4),
        "retention_correct_after": kept_after.correct, "retention_total": kept_after.total,
        "generate_s": round(generate_s, 1),
    })
    accuracy = ", ".join(
        f"{lang} {fact_accuracy(rows, lang)['after']}/{fact_accuracy(rows, lang)['total']}" for lang in LANGUAGES
        if fact_accuracy(rows, lang)["total"]
    )
    return StageResult(
        metrics=metrics, gates=[gate],
        artifacts={"samples": SAMPLES_FILE, "retention": RETENTION_FILE, "facts": FACTS_MD, "facts_jsonl": FACTS_JSONL},
        note=f"held-out-phrasing fact accuracy {accuracy or 'n/a'}; BLEU-4 {scores_before.bleu4:.3f} -> "
             f"{scores_after.bleu4:.3f}; retention {kept_after.correct}/{kept_after.total}",
    )
