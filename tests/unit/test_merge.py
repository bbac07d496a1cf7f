"""The merge stage on a tiny Llama: a correct merge passes both gates, a tampered one fails them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.unit.tiny_llm import make_tokenizer, save_tiny_model
from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.stage_api import StageContext, StageRecord, StageResult
from toolkit.model_io.modeling import load_model, load_tokenizer
from toolkit.stages import merge


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StageRecord]:
    """A tiny base model and a LoRA adapter with non-zero (random) B matrices, as upstream records."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("merge-inputs")
    base = save_tiny_model(root / "base" / "model")
    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    adapter = root / "finetune" / "adapter"
    peft_model.save_pretrained(str(adapter))
    tokenizer = load_tokenizer(base)
    tokenizer.save_pretrained(str(adapter))
    (adapter / "chat_template.jinja").write_text(tokenizer.chat_template)
    return {
        "base_model": StageRecord("base_model", base.parent, "k", "d", {}, {"model": "model"}, {}),
        "finetune": StageRecord("finetune", adapter.parent, "k", "d", {}, {"adapter": "adapter"}, {}),
    }


def _run(tmp_path: Path, inputs: dict[str, StageRecord]) -> tuple[Path, StageResult]:
    config = BuildConfig.model_validate({"workspace": str(tmp_path)})
    out = tmp_path / "merge"
    out.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(merge, "GATE_NEW_TOKENS", 12)  # enough for a tampered model to diverge; keeps tests fast
        return out, merge.run(StageContext(config=config, out_dir=out, inputs=inputs, workspace=tmp_path))


@pytest.fixture(scope="module")
def merged_once(tmp_path_factory: pytest.TempPathFactory, stage_inputs) -> tuple[Path, StageResult]:  # type: ignore[no-untyped-def]
    return _run(tmp_path_factory.mktemp("merged"), stage_inputs)


def test_correct_merge_passes_and_saves_a_complete_model(merged_once) -> None:  # type: ignore[no-untyped-def]
    out, result = merged_once
    gates = {g.name: g for g in result.gates}
    assert gates["merged_equals_adapter"].passed, gates["merged_equals_adapter"].detail
    assert gates["special_tokens_and_template"].passed, gates["special_tokens_and_template"].detail
    model_dir = out / result.artifacts["model"]
    files = {p.name for p in model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= files
    assert not any("lora" in k for k in load_file(str(model_dir / "model.safetensors")))  # really merged
    golden = [json.loads(line) for line in (out / result.artifacts["golden"]).read_text().splitlines()]
    assert len(golden) == result.metrics["golden_prompts"] >= 5 and all(g["match"] for g in golden)
    assert result.metrics["eos_token_id"] == make_tokenizer().convert_tokens_to_ids("<|im_end|>")


def test_tampered_merged_weights_fail_the_gate(
    tmp_path: Path, stage_inputs, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    original = merge.merge_to_dir

    def merge_then_tamper(adapter_model, tokenizer, template, out):  # type: ignore[no-untyped-def]
        original(adapter_model, tokenizer, template, out)
        weights = load_file(str(out / "model.safetensors"))
        generator = torch.Generator().manual_seed(1)
        tampered = {k: v + 0.5 * torch.randn(v.shape, generator=generator) if "mlp" in k else v
                    for k, v in weights.items()}
        save_file(tampered, str(out / "model.safetensors"), metadata={"format": "pt"})

    monkeypatch.setattr(merge, "merge_to_dir", merge_then_tamper)
    _, result = _run(tmp_path, stage_inputs)
    gate = next(g for g in result.gates if g.name == "merged_equals_adapter")
    assert not gate.passed and gate.blocking
    assert "differs" in gate.detail


def test_lost_special_tokens_or_template_fail_the_gate(tmp_path: Path, merged_once) -> None:  # type: ignore[no-untyped-def]
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(merged_once[0] / "model", model_dir)
    tokenizer = load_tokenizer(model_dir)
    template = tokenizer.chat_template
    assert merge.token_gate(tokenizer, template, model_dir).passed

    (model_dir / "chat_template.jinja").write_text(template.replace("<|im_end|>", "</s>"))
    gate = merge.token_gate(tokenizer, template, model_dir)
    assert not gate.passed and "template" in gate.detail

    (model_dir / "chat_template.jinja").write_text(template)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = "<|im_start|>"
    config_path.write_text(json.dumps(config))
    gate = merge.token_gate(tokenizer, template, model_dir)
    assert not gate.passed and "eos_token" in gate.detail
