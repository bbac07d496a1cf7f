"""Stage ``evaluate``: the test split and the retention set, before and after fine-tuning.

"Before" is the base model, "after" the base model with the LoRA adapter (unmerged: the merge
stage proves the merged weights behave the same). Scores: corpus BLEU-4, ROUGE-L (CJK-aware),
fact exact match, and general-knowledge retention, which gates the build: an adapter that makes
the model forget what it knew fails here rather than in production.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from toolkit.finetune import read_split
from toolkit.modeling import CHAT_TEMPLATE_FILE, Messages, generate_replies, load_model, load_tokenizer
from toolkit.pipeline import StageContext, StageResult
from toolkit.report import GateResult
from toolkit.retention import retention_questions, score_retention
from toolkit.textmetrics import score_answers

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
RETENTION_FILE = "retention.jsonl"


def _answers(model: Any, tokenizer: Any, prompts: list[Messages], max_new_tokens: int) -> list[str]:
    return generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=8)


def run(ctx: StageContext) -> StageResult:
    """Score the base and the fine-tuned model; gate on retention."""
    from peft import PeftModel

    cfg = ctx.config.eval
    adapter_dir = ctx.inputs["finetune"].path("adapter")
    tokenizer = load_tokenizer(adapter_dir)
    tokenizer.chat_template = (adapter_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    test = read_split(ctx.inputs["data"], "test")[: cfg.max_examples]
    prompts = [ex.prompt for ex in test]
    references = [ex.answer for ex in test]
    facts = [ex.facts for ex in test]
    general: list[Messages] = [[{"role": "user", "content": q}] for q in retention_questions()]

    started = time.perf_counter()
    model = load_model(ctx.inputs["base_model"].path("model"))
    before = _answers(model, tokenizer, prompts + general, cfg.max_new_tokens)
    # PEFT injects the adapter into the same module tree: "after" reuses the loaded base weights.
    tuned = PeftModel.from_pretrained(model, str(adapter_dir))
    tuned.eval()
    after = _answers(tuned, tokenizer, prompts + general, cfg.max_new_tokens)
    generate_s = time.perf_counter() - started

    n = len(test)
    scores_before = score_answers(before[:n], references, facts)
    scores_after = score_answers(after[:n], references, facts)
    kept_before = score_retention(before[n:])
    kept_after = score_retention(after[n:])

    with (ctx.out_dir / SAMPLES_FILE).open("w", encoding="utf-8") as fh:
        for ex, b, a in zip(test, before, after, strict=False):
            fh.write(json.dumps({
                "question": ex.prompt[-1]["content"], "reference": ex.answer, "facts": ex.facts,
                "before": b, "after": a, "source": ex.source,
            }, ensure_ascii=False) + "\n")
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
    for name, scores in (("before", scores_before), ("after", scores_after)):
        for key in ("bleu4", "rouge_l", "fact_em"):
            metrics[f"{key}_{name}"] = scores.as_dict()[key]
    metrics.update({
        "retention_before": round(kept_before.score, 4),
        "retention_after": round(kept_after.score, 4),
        "generate_s": round(generate_s, 1),
    })
    return StageResult(
        metrics=metrics, gates=[gate],
        artifacts={"samples": SAMPLES_FILE, "retention": RETENTION_FILE},
        note=f"BLEU-4 {scores_before.bleu4:.3f} -> {scores_after.bleu4:.3f}, "
             f"fact EM {scores_before.fact_em:.2f} -> {scores_after.fact_em:.2f}, "
             f"retention {kept_after.correct}/{kept_after.total}",
    )
