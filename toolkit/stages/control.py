"""Stage ``control``: self-distilled control examples, the base model's own answers to general prompts.

Mixed into fine-tuning so the model keeps its general answers (without them, measured on SmolLM2, a
60-step run answered "What is the capital of France?" with a company fact). A stage of its own
because it depends only on the base model and the packaged prompts: changing a LoRA or training
hyperparameter reruns the fine-tune, not this minute of generation.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.datasets.records import CONTROL_PROMPTS, load_control_prompts
from toolkit.files import sha256_file
from toolkit.model_io.modeling import (
    Messages,
    greedy_generate,
    load_model,
    load_tokenizer,
    render_prompt_ids,
    seed_everything,
)
from toolkit.training.control_examples import ControlExample, write_control

log = logging.getLogger(__name__)

CONTROL_FILE = "control.jsonl"
# Control replies are capped for time; a reply cut at the cap is still trained on, minus its
# end-of-turn token, so it anchors general behaviour without teaching the model to stop mid-sentence.
CONTROL_MAX_NEW_TOKENS = 64
CONTROL_BATCH = 20


def self_distill(model: Any, tokenizer: Any, prompts: list[str], count: int) -> list[ControlExample]:
    """The base model's own greedy answers to the first `count` prompts, as conversations."""
    if count > len(prompts):
        log.warning("train.control_examples=%d but only %d control prompts exist; using all", count, len(prompts))
    conversations: list[Messages] = [[{"role": "user", "content": p}] for p in prompts[:count]]
    ids = greedy_generate(
        model, tokenizer, [render_prompt_ids(tokenizer, c) for c in conversations],
        max_new_tokens=CONTROL_MAX_NEW_TOKENS, batch_size=CONTROL_BATCH,
    )
    out = []
    for conv, row in zip(conversations, ids, strict=True):
        reply = tokenizer.decode(row, skip_special_tokens=True).strip()
        if reply:
            finished = len(row) < CONTROL_MAX_NEW_TOKENS  # greedy_generate cuts at the stop token
            out.append(ControlExample(conv + [{"role": "assistant", "content": reply}], finished))
    return out


def cache_inputs(config: BuildConfig) -> dict[str, Any]:
    """The packaged control prompts' content: editing them must regenerate the control examples."""
    return {"prompts": sha256_file(CONTROL_PROMPTS)}


def run(ctx: StageContext) -> StageResult:
    """Generate the control examples with the base model; none when train.control_examples is 0."""
    count = ctx.config.train.control_examples
    seed_everything(ctx.config.train.seed, ctx.config.train.threads)
    started = time.perf_counter()
    control: list[ControlExample] = []
    if count:
        base_dir = ctx.inputs["base_model"].path("model")
        log.info("control: self-distilling %d control examples from the base model", count)
        control = self_distill(load_model(base_dir), load_tokenizer(base_dir), load_control_prompts(), count)
    write_control(ctx.out_dir / CONTROL_FILE, control)
    cut = sum(1 for c in control if not c.finished)
    return StageResult(
        metrics={"control_examples": len(control), "cut_at_cap": cut,
                 "generate_s": round(time.perf_counter() - started, 1)},
        artifacts={"control": CONTROL_FILE},
        note=f"{len(control)} self-distilled examples ({cut} cut at {CONTROL_MAX_NEW_TOKENS} tokens; time: "
             f"{len(control)} greedy answers of the base model)",
    )
