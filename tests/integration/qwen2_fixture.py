"""A random-weight Qwen2 with Qwen2's real tokenizer and Qwen2.5's chat template (tools included), exported.

Small and separate on purpose: the tokenizer comes from llama.cpp's vocabulary-only GGUF
(``ggml-vocab-qwen2.gguf``, fetched by ``make test`` into ``.cache/llama-cpp-vocab``), the model is a
2-layer Qwen2ForCausalLM (hidden 64) with random weights, exported by the toolkit's own exporter. A
shared fixture of several families can replace this module; the tests only need ``qwen2_onnx``'s
export directory (graph + tokenizer files + chat template).
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB_DIR = REPO_ROOT / ".cache" / "llama-cpp-vocab"
QWEN2_GGUF = VOCAB_DIR / "ggml-vocab-qwen2.gguf"
TEMPLATE = REPO_ROOT / "tests" / "fixtures" / "chat_templates" / "qwen2.5-tools.jinja"
IM_END = 151645  # <|im_end|> in Qwen2's vocabulary
VOCAB = 151936  # the embedding rows of Qwen2 checkpoints (the tokenizer has 151646 tokens; the rest is padding)


def qwen2_tokenizer(out_dir: Path) -> Path:
    """Qwen2's tokenizer converted from the GGUF (about 10 s), saved with the tools-aware template."""
    from transformers import AutoTokenizer

    if not QWEN2_GGUF.is_file():
        raise FileNotFoundError(f"{QWEN2_GGUF} is missing: `make test` fetches it (python tests/fetch_vocab.py "
                                f"{VOCAB_DIR} qwen2)")
    tokenizer = AutoTokenizer.from_pretrained(str(VOCAB_DIR), gguf_file=QWEN2_GGUF.name)
    tokenizer.chat_template = TEMPLATE.read_text()
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def export_random_qwen2(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random Qwen2 with the real Qwen2 tokenizer, exported to ``out_dir/onnx/model.onnx``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from toolkit.export.torch_to_onnx import export_onnx
    from toolkit.tokenizer_files import copy_tokenizer_files

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=IM_END, pad_token_id=IM_END,
    )
    hf_dir = out_dir / "hf"
    Qwen2ForCausalLM(config).eval().save_pretrained(str(hf_dir))
    copy_tokenizer_files(qwen2_tokenizer(out_dir / "tokenizer"), hf_dir)
    return export_onnx(hf_dir, out_dir / "onnx")
