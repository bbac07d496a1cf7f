"""Stage ``finetune``: LoRA on the data stage's train split, plus the control stage's self-distilled examples.

Examples are rendered with the base model's own chat template; that exact template string is saved
beside the adapter (``adapter/chat_template.jinja``) and its sha256 is in the metrics, so serving
renders prompts exactly as training did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from toolkit.buildsys.config import EvalSection
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.datasets.records import Example, read_split
from toolkit.files import sha256_text
from toolkit.model_io.modeling import (
    CHAT_TEMPLATE_FILE,
    Messages,
    chat_template_of,
    decode_text,
    greedy_generate,
    load_model,
    load_tokenizer,
    render_prompt_ids,
    seed_everything,
)
from toolkit.model_io.tokenizer_files import copy_tokenizer_files
from toolkit.quality.textmetrics import contains_facts
from toolkit.training.control_examples import read_control
from toolkit.training.examples import TokenizedExample, build_examples
from toolkit.training.lora import train_lora

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def tokenize_all(
    tokenizer: Any, conversations: list[Messages], max_seq_len: int, train_eos: list[bool] | None = None
) -> tuple[list[TokenizedExample], int]:
    """Examples with assistant labels, and how many conversations had no assistant token left."""
    examples, dropped = [], 0
    for i, messages in enumerate(conversations):
        made = build_examples(tokenizer, messages, max_seq_len, train_eos=train_eos[i] if train_eos else True)
        dropped += not made
        examples += made
    return examples, dropped


def fact_probe(tokenizer: Any, rows: list[Example], cfg: EvalSection) -> Callable[[Any], float] | None:
    """Val fact accuracy of a model in training: the share of `rows` answered with all their facts."""
    if not rows:
        return None
    prompts = [render_prompt_ids(tokenizer, r.prompt) for r in rows]

    def probe(model: Any) -> float:
        ids = greedy_generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        answers = [decode_text(tokenizer, row) for row in ids]
        return round(sum(contains_facts(a, r.facts) for a, r in zip(answers, rows, strict=True)) / len(rows), 4)

    return probe


def _overhead(setup: dict[str, Any]) -> float:
    """Seconds of the fine-tune not spent in optimizer steps."""
    return float(setup["val_loss_s"] + setup["probe_s"] + setup["frozen_prefix_s"] + setup.get("kl_teacher_s", 0.0))


def run(ctx: StageContext) -> StageResult:
    """Fine-tune LoRA adapters on the base model; save them with the tokenizer and chat template."""
    train_cfg, lora_cfg = ctx.config.train, ctx.config.lora
    seed_everything(train_cfg.seed, train_cfg.threads)
    base_dir = ctx.inputs["base_model"].path("model")
    tokenizer = load_tokenizer(base_dir)
    template = chat_template_of(tokenizer)
    model = load_model(base_dir)

    control = read_control(ctx.inputs["control"].path("control"))

    max_len = ctx.config.data.max_seq_len
    data_rows = read_split(ctx.inputs["data"].dir, "train")
    sft_control = control if train_cfg.control_sft else []
    train_examples, dropped = tokenize_all(
        tokenizer, [r.messages for r in data_rows] + [c.messages for c in sft_control], max_len,
        train_eos=[True] * len(data_rows) + [c.finished for c in sft_control],
    )
    anchors, _ = (tokenize_all(tokenizer, [c.messages for c in control], max_len,
                               train_eos=[c.finished for c in control]) if train_cfg.kl_weight > 0 else ([], 0))
    val_rows = read_split(ctx.inputs["data"].dir, "val")[: train_cfg.val_examples]
    val_examples, _ = tokenize_all(tokenizer, [r.messages for r in val_rows], max_len)
    if dropped:
        log.warning("%d training conversations had no assistant token within data.max_seq_len=%d; skipped",
                    dropped, max_len)

    probe = fact_probe(tokenizer, [r for r in read_split(ctx.inputs["data"].dir, "val") if r.facts]
                       [: train_cfg.probe_examples], ctx.config.eval)
    started, cpu_started = time.perf_counter(), time.process_time()
    peft_model, train_log = train_lora(model, tokenizer, train_examples, val_examples, lora_cfg, train_cfg,
                                       probe=probe, anchor_examples=anchors)
    train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started

    adapter = ctx.out_dir / ADAPTER_DIR
    peft_model.save_pretrained(str(adapter), safe_serialization=True)
    copy_tokenizer_files(base_dir, adapter)  # byte for byte: never re-derived by the installed transformers
    (adapter / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")  # the exact string trained with
    train_log.write_csv(ctx.out_dir / "loss.csv")
    train_log.write_png(ctx.out_dir / "loss.png")

    rows = train_log.rows
    val_losses = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    setup = train_log.setup
    teacher_cached = "kl_teacher_s" in setup
    return StageResult(
        metrics={
            "steps": len(rows),
            **train_log.setup,
            "val_fact_accuracy": [[r["step"], r["val_fact_accuracy"]] for r in rows if "val_fact_accuracy" in r],
            "train_examples": len(train_examples),
            "control_examples": len(control),
            "kl_anchor_examples": len(anchors),
            "kl_last": next((round(r["kl"], 5) for r in reversed(rows) if "kl" in r), None),
            "val_examples": len(val_examples),
            "dropped_examples": dropped,
            "train_loss_first": round(rows[0]["train_loss"], 4),
            "train_loss_last": round(rows[-1]["train_loss"], 4),
            "val_loss_last": round(val_losses[-1], 4) if val_losses else None,
            "trainable_params": trainable,
            "train_s": round(train_s, 1),
            "s_per_step": round(train_s / max(len(rows), 1), 2),
            # CPU seconds over all threads: comparable across runs when other jobs share the machine.
            "train_cpu_s": round(train_cpu_s, 1),
            "chat_template_sha256": sha256_text(template),
        },
        artifacts={
            "adapter": ADAPTER_DIR,
            "chat_template": f"{ADAPTER_DIR}/{CHAT_TEMPLATE_FILE}",
            "loss_csv": "loss.csv",
            "loss_png": "loss.png",
        },
        note=f"{len(rows)} steps, {len(control)} control examples"
             + (f", KL anchor x{train_cfg.kl_weight:g} on {len(anchors)}" if anchors else "")
             + (f" (teacher's top {train_cfg.kl_top_k}, {setup['kl_teacher_rest_mass']:.2%} of its mass outside)"
                if teacher_cached else "")
             + f" (time: {train_s:.0f} s, of which steps {train_s - _overhead(setup):.0f} s, "
               f"val loss {setup['val_loss_s']:.0f} s, fact probes {setup['probe_s']:.0f} s, "
               f"frozen-prefix cache {setup['frozen_prefix_s']:.0f} s"
             + (f", KL teacher {setup['kl_teacher_s']:.0f} s" if teacher_cached else "") + ")",
    )
