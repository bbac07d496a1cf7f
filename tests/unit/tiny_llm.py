"""A tiny chat model for unit tests: a byte-level BPE tokenizer with ChatML tokens and a 2-layer Llama.

Built in well under a second, so the fine-tune, merge and base-model tests exercise the real code
paths (chat template, PEFT, safetensors) without the 135M model.
"""

from __future__ import annotations

from pathlib import Path

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


def make_tokenizer(*, defects: bool = False):  # type: ignore[no-untyped-def]
    """A LlamaTokenizerFast over a freshly trained byte-level BPE, with a ChatML chat template.

    `defects=True` reproduces the SmolLM2 GGUF conversion: eos is <|im_start|> and a bos is added.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_start|>" if defects else "<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token=None if defects else "<|im_end|>",
        add_bos_token=defects,
        add_eos_token=False,
        chat_template=CHATML_TEMPLATE,
        legacy=False,
        add_prefix_space=None,
    )


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


def save_tiny_model(out: Path, *, defects: bool = False, seed: int = 0) -> Path:
    """Write a tiny HF model directory (safetensors + tokenizer + template); return it."""
    tokenizer = make_tokenizer(defects=defects)
    model = make_model(len(tokenizer), seed=seed)
    if defects:
        model.config.eos_token_id = 1
        model.generation_config.eos_token_id = 1
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
