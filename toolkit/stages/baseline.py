"""Stage ``baseline``: the base model's answers to the test split and the general questions.

The "before" half of the evaluation. It depends only on the base model and the data, so changing the
LoRA recipe reruns ``finetune`` and ``evaluate`` but not this. The held-out fact questions are not
asked here: they measure what fine-tuning taught, and the base model was taught nothing.
"""

from __future__ import annotations

import json
import time
from typing import Any

from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.datasets.records import read_split
from toolkit.files import sha256_file
from toolkit.model_io.modeling import load_model, load_tokenizer
from toolkit.quality.scoring import GENERAL_QUESTIONS, answer_prompts, evaluation_questions, set_accuracies

ANSWERS_FILE = "answers.jsonl"


def cache_inputs(config: BuildConfig) -> dict[str, Any]:
    """The packaged general questions' content: editing them must ask the base model again."""
    return {"general_questions": sha256_file(GENERAL_QUESTIONS)}


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.eval
    base_dir = ctx.inputs["base_model"].path("model")
    test = read_split(ctx.inputs["data"].dir, "test")[: cfg.max_examples]
    questions = evaluation_questions(test)
    started = time.perf_counter()
    answers = answer_prompts(load_model(base_dir), load_tokenizer(base_dir), [q.prompt for q in questions], cfg)
    generate_s = time.perf_counter() - started
    with (ctx.out_dir / ANSWERS_FILE).open("w", encoding="utf-8") as fh:
        for q, answer in zip(questions, answers, strict=True):
            fh.write(json.dumps({"set": q.set, "question": q.text, "answer": answer, "right": q.right(answer)},
                                ensure_ascii=False) + "\n")
    scores = set_accuracies(questions, answers)
    return StageResult(
        metrics={"answers": len(answers), "generate_s": round(generate_s, 1),
                 **{f"{name}_right": acc.correct for name, acc in scores.items()}},
        artifacts={"answers": ANSWERS_FILE},
        note=f"{len(answers)} base-model answers in {generate_s:.0f} s"
             + (f"; general {scores['general'].correct}/{scores['general'].total}" if "general" in scores else ""),
    )
