"""Stage ``baseline``: the base model's answers to the test split and the retention set.

The "before" half of the evaluation. It depends only on the base model and the data, so changing the
LoRA recipe reruns ``finetune`` and ``evaluate`` but not this.
"""

from __future__ import annotations

import json
import time

from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.datasets.records import read_split
from toolkit.model_io.modeling import load_model, load_tokenizer
from toolkit.quality.scoring import answer_prompts, evaluation_prompts

ANSWERS_FILE = "answers.jsonl"


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.eval
    base_dir = ctx.inputs["base_model"].path("model")
    test = read_split(ctx.inputs["data"].dir, "test")[: cfg.max_examples]
    prompts = evaluation_prompts(test)
    started = time.perf_counter()
    answers = answer_prompts(load_model(base_dir), load_tokenizer(base_dir), prompts, cfg)
    generate_s = time.perf_counter() - started
    with (ctx.out_dir / ANSWERS_FILE).open("w", encoding="utf-8") as fh:
        for messages, answer in zip(prompts, answers, strict=True):
            fh.write(json.dumps({"question": messages[-1]["content"], "answer": answer}, ensure_ascii=False) + "\n")
    return StageResult(
        metrics={"answers": len(answers), "generate_s": round(generate_s, 1)},
        artifacts={"answers": ANSWERS_FILE},
        note=f"{len(answers)} base-model answers in {generate_s:.0f} s",
    )
