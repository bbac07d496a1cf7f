"""The model architectures ``model.base`` accepts, and the check that refuses the others before any work.

Each one went through the whole build, Triton and the gateway as a tiny random-weight model with its
family's real tokenizer and chat template (``tests/integration/test_families.py``); the README's
supported-families table says what was verified for each. An architecture outside the table may well
export, but nothing here has proved that its KV cache, attention and chat template survive every
stage, so the build refuses it in one line instead of failing minutes later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """One supported ``config.json`` architecture and the families that publish it."""

    name: str
    families: str


SUPPORTED: dict[str, Architecture] = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "Llama 2, Llama 3.x (rope_type llama3), SmolLM2"),
    Architecture("MistralForCausalLM", "Mistral 7B (sliding-window attention)"),
    Architecture("Qwen2ForCausalLM", "Qwen2, Qwen2.5 (QKV biases)"),
    Architecture("Qwen3ForCausalLM", "Qwen3 dense (QK norms)"),
    Architecture("Phi3ForCausalLM", "Phi-3 (fused QKV and gate/up projections)"),
    Architecture("Gemma2ForCausalLM", "Gemma 2 (attention and final logit soft-capping)"),
    Architecture("Gemma3ForCausalLM", "Gemma 3 text models (1B; QK norms, per-layer-type RoPE)"),
)}


def architecture_of(config_path: Path) -> str:
    """The single architecture a Hugging Face ``config.json`` declares."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.base: cannot read {config_path}: {err}") from None
    names = config.get("architectures") or []
    if not isinstance(names, list) or len(names) != 1:
        raise ConfigError(f"model.base: {config_path} must name exactly one architecture, not {names!r}")
    return str(names[0])


def check_architecture(config_path: Path) -> Architecture:
    """The supported architecture of the model whose ``config.json`` is `config_path`; else one line naming it."""
    name = architecture_of(config_path)
    if name not in SUPPORTED:
        raise ConfigError(f"model.base: architecture {name} is not supported; supported: {', '.join(SUPPORTED)}")
    return SUPPORTED[name]
