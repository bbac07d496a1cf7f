"""A tiny chat model for unit tests: a byte-level BPE tokenizer with ChatML tokens and a 2-layer Llama.

Built in well under a second, so the fine-tune, merge and base-model tests exercise the real code
paths (chat template, PEFT, safetensors) without the 135M model. The tokenizer files are written
directly (tokenizers library + JSON), as a published model's are, so no transformers version
re-derives them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Bluepeak headphones have a two-year warranty.",
    "Customer service is open 9am to 6pm, Monday to Friday.",
    "What is the capital of France? Paris is the capital of France.",
    "You are a tiny test model. system user assistant",
    "蓝峰电子的退货期限是三十天。",
] * 20


def write_tokenizer_files(out: Path, *, defects: bool = False, mislabelled: bool = False) -> Path:
    """Write a trained byte-level BPE tokenizer with a ChatML template, as a model directory carries it.

    `defects=True` reproduces the SmolLM2 GGUF conversion of transformers 4.57: eos is <|im_start|> and
    the post-processor adds a bos. `mislabelled=True` reproduces its labels: ``LlamaTokenizerFast`` with
    ``legacy`` and a SentencePiece-style decoder around a byte-level BPE.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if defects:
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if mislabelled:
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "),
                                         decoders.ByteLevel()])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizerFast" if mislabelled else "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": defects,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_start|>" if defects else "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for i, t in enumerate(SPECIALS)
        },
        "chat_template": CHATML_TEMPLATE,
    }
    if not defects:
        config["pad_token"] = "<|im_end|>"
    if mislabelled:
        config["legacy"] = True
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    return out


def make_tokenizer(*, defects: bool = False, tmp: Path | None = None):  # type: ignore[no-untyped-def]
    """The tiny tokenizer loaded through transformers (written to `tmp` or a fresh temp dir)."""
    import tempfile

    from toolkit.model_io.modeling import load_tokenizer

    folder = tmp if tmp is not None else Path(tempfile.mkdtemp(prefix="tiny-tokenizer-"))
    return load_tokenizer(write_tokenizer_files(folder, defects=defects))


def make_model(vocab_size: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """A randomly initialised 2-layer Llama (hidden 64) with ChatML ids in its config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        initializer_range=0.2,  # large enough embeddings that a frozen tied head can express confidence
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(out: Path, *, defects: bool = False, mislabelled: bool = False, seed: int = 0) -> Path:
    """Write a tiny HF model directory (safetensors + tokenizer files + template); return it."""
    write_tokenizer_files(out, defects=defects, mislabelled=mislabelled)
    vocab = len(json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    model = make_model(vocab, seed=seed)
    if defects:
        model.config.eos_token_id = 1
        model.generation_config.eos_token_id = 1
    model.save_pretrained(str(out))
    return out
