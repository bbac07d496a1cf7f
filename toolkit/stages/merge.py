"""Stage ``merge``: fold the LoRA adapter into the base weights and prove nothing changed on the way.

The merged directory (safetensors weights, tokenizer, chat template, generation config) is what
export and serving start from, so it is re-loaded from disk and gated against the adapter model:
same greedy tokens on the golden prompts, same special tokens, same chat template.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from toolkit.buildsys.report import GateResult
from toolkit.buildsys.stage_api import StageContext, StageResult
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
    stop_token_ids,
)
from toolkit.model_io.tokenizer_files import copy_tokenizer_files, portable_model_config
from toolkit.quality.golden import golden_conversations
from toolkit.quality.portability import portability_gate

log = logging.getLogger(__name__)

MODEL_DIR = "model"
GOLDEN_FILE = "golden.jsonl"
# Enough tokens for a diverging merge to show; the golden set is also replayed by later gates.
GATE_NEW_TOKENS = 32


def load_adapter_model(base_dir: Path, adapter_dir: Path) -> Any:
    """The base model with the LoRA adapter applied (unmerged), in eval mode."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir))
    model.eval()
    return model


def merge_to_dir(adapter_model: Any, tokenizer_dir: Path, template: str, out: Path) -> None:
    """merge_and_unload and save weights (safetensors) and generation config; copy the tokenizer files.

    The tokenizer files are the base model's, copied byte for byte (a ``save_pretrained`` of the
    loaded tokenizer would re-derive them through the installed transformers), and config.json
    keeps the spelling transformers 4.x reads.
    """
    merged = adapter_model.merge_and_unload()
    merged.save_pretrained(str(out))
    copy_tokenizer_files(tokenizer_dir, out)
    (out / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    portable_model_config(out)


def special_tokens(tokenizer: Any) -> dict[str, Any]:
    """What must survive the merge for serving to render and stop exactly as training did."""
    return {
        "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
        "bos_token": tokenizer.bos_token, "bos_token_id": tokenizer.bos_token_id,
        "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
    }


def token_gate(tokenizer: Any, template: str, merged_dir: Path) -> GateResult:
    """Re-load the saved tokenizer files and compare special tokens, stop ids and the template."""
    from transformers import GenerationConfig

    saved = load_tokenizer(merged_dir)
    problems = [
        f"{key}: {want!r} -> {got!r}"
        for key, want in special_tokens(tokenizer).items()
        if (got := special_tokens(saved)[key]) != want
    ]
    if chat_template_of(saved) != template:
        problems.append("chat template differs from the one trained with")
    template_file = merged_dir / CHAT_TEMPLATE_FILE
    if not template_file.is_file() or template_file.read_text(encoding="utf-8") != template:
        problems.append(f"{CHAT_TEMPLATE_FILE} missing or different")
    gen = GenerationConfig.from_pretrained(str(merged_dir))
    if tokenizer.eos_token_id not in stop_token_ids(saved, gen):
        problems.append(f"generation config stops on {gen.eos_token_id}, not eos {tokenizer.eos_token_id}")
    return GateResult(
        name="special_tokens_and_template", passed=not problems, value=len(problems), threshold=0,
        detail="; ".join(problems) or "eos/bos/pad, add_bos_token, stop ids and chat template survive",
    )


def greedy_gate(
    adapter_ids: list[list[int]], merged_ids: list[list[int]], texts: list[tuple[str, str]]
) -> GateResult:
    """Greedy tokens of the merged model must equal the adapter model's on every golden prompt."""
    same = [a == m for a, m in zip(adapter_ids, merged_ids, strict=True)]
    detail = "identical greedy tokens on every golden prompt"
    if not all(same):
        i = same.index(False)
        detail = f"prompt {i} differs: adapter {texts[i][0]!r} vs merged {texts[i][1]!r}"
    return GateResult(
        name="merged_equals_adapter", passed=all(same), value=sum(same) / len(same), threshold=1.0, detail=detail,
    )


def golden_ids(model: Any, tokenizer: Any, conversations: list[Messages]) -> list[list[int]]:
    prompts = [render_prompt_ids(tokenizer, conv) for conv in conversations]
    return greedy_generate(model, tokenizer, prompts, max_new_tokens=GATE_NEW_TOKENS, batch_size=len(prompts))


def run(ctx: StageContext) -> StageResult:
    """Merge, save, re-load and gate; golden outputs go to golden.jsonl for the report."""
    from transformers import GenerationConfig

    base_dir = ctx.inputs["base_model"].path("model")
    adapter_dir = ctx.inputs["finetune"].path("adapter")
    tokenizer = load_tokenizer(adapter_dir)
    template = (adapter_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    tokenizer.chat_template = template  # the exact string trained with

    conversations = golden_conversations()
    adapter_model = load_adapter_model(base_dir, adapter_dir)
    adapter_out = golden_ids(adapter_model, tokenizer, conversations)
    out = ctx.out_dir / MODEL_DIR
    merge_to_dir(adapter_model, adapter_dir, template, out)
    del adapter_model

    merged = load_model(out)  # from disk: the gate checks what export will read
    merged_tokenizer = load_tokenizer(out)
    merged_out = golden_ids(merged, merged_tokenizer, conversations)
    texts = [(decode_text(tokenizer, a), decode_text(tokenizer, m))
             for a, m in zip(adapter_out, merged_out, strict=True)]
    with (ctx.out_dir / GOLDEN_FILE).open("w", encoding="utf-8") as fh:
        for conv, (a_text, m_text), a_ids, m_ids in zip(conversations, texts, adapter_out, merged_out,
                                                         strict=True):
            fh.write(json.dumps({"messages": conv, "adapter": a_text, "merged": m_text,
                                 "match": a_ids == m_ids}, ensure_ascii=False) + "\n")
    gates = [
        greedy_gate(adapter_out, merged_out, texts),
        token_gate(tokenizer, template, out),
        portability_gate(out, stop_token_ids(merged_tokenizer, GenerationConfig.from_pretrained(str(out)))),
    ]
    return StageResult(
        metrics={
            "golden_prompts": len(conversations),
            "gate_new_tokens": GATE_NEW_TOKENS,
            "chat_template_sha256": sha256_text(template),
            **{k: v for k, v in special_tokens(merged_tokenizer).items() if k.endswith("_id")},
        },
        gates=gates,
        artifacts={"model": MODEL_DIR, "chat_template": f"{MODEL_DIR}/{CHAT_TEMPLATE_FILE}", "golden": GOLDEN_FILE},
    )
