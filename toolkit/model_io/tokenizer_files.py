"""Tokenizer files that every consumer reads the same way: transformers 4.x and 5.x, the raw
``tokenizers`` library, vLLM, TGI and llama.cpp's GGUF converter.

Three rules keep a model directory portable:

- A GGUF base gets the model family's own published tokenizer files, written here from the GGUF's
  vocabulary (:func:`write_gguf_tokenizer`), not whatever a transformers version's GGUF converter
  derives (4.57 labels SmolLM2's byte-level BPE ``LlamaTokenizerFast`` with a SentencePiece-style
  decoder; 5.x labels it ``TokenizersBackend``, a class 4.x cannot load).
- A Hugging Face directory keeps its own tokenizer files; the few fixes the build needs (eos, bos,
  pad, context) are edits of the JSON keys in question (:func:`fix_tokenizer_files`), never a
  ``save_pretrained`` round trip that re-derives the files through the installed transformers.
- Every later copy (merge, export, repository) copies the files byte for byte
  (:func:`copy_tokenizer_files`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from toolkit.errors import StageError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# Everything a tokenizer may be made of; copied together, byte for byte.
TOKENIZER_FILE_NAMES = (
    TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE, "vocab.json", "merges.txt",
    "added_tokens.json", "tokenizer.model", "chat_template.json",
)

# llama.cpp's `tokenizer.ggml.pre` names -> the pre-tokenizer of the family's published tokenizer.json.
# "smollm" splits every digit before GPT-2's byte-level regex (llama.cpp: LLAMA_VOCAB_PRE_TYPE_SMOLLM).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
GGUF_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "gpt-2": _BYTE_LEVEL,
    "default": _BYTE_LEVEL,
}
_GGUF_CONTROL = 3  # llama.cpp token type CONTROL: a special token


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise StageError(f"{path} is not a JSON object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of `src` into `dst` unchanged; return the names copied."""
    if not (src / TOKENIZER_JSON).is_file():
        raise StageError(f"{src} has no {TOKENIZER_JSON}; only fast (tokenizer.json) tokenizers are supported")
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILE_NAMES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------- GGUF


def _gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


def write_gguf_tokenizer(gguf: Path, out: Path, context_length: int | None = None) -> dict[str, Any]:
    """Write the published-style tokenizer files of a GGUF's byte-level BPE vocabulary into `out`.

    ``tokenizer.json`` (BPE, the family's pre-tokenizer, ByteLevel post-processor and decoder),
    ``tokenizer_config.json`` naming ``GPT2Tokenizer``, ``special_tokens_map.json``,
    ``vocab.json``/``merges.txt`` for slow-tokenizer readers, and ``chat_template.jinja``.
    Returns facts for the report.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    reader = GGUFReader(str(gguf))
    kind = _gguf_field(reader, "tokenizer.ggml.model")
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise StageError(f"{gguf.name}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                         "use a Hugging Face model directory as model.base")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise StageError(f"{gguf.name}: pre-tokenizer {pre!r} is not known here ({', '.join(GGUF_PRE_TOKENIZERS)}); "
                         "use a Hugging Face model directory as model.base")
    tokens: list[str] = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer_from_json(GGUF_PRE_TOKENIZERS[pre])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types, strict=True) if kind == _GGUF_CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / TOKENIZER_JSON))

    def token(key: str) -> str | None:
        index = _gguf_field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None else None

    template = _gguf_field(reader, "tokenizer.chat_template")
    named = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
             "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id")}
    named = {k: v for k, v in named.items() if v is not None}
    extra = [t for t in specials if template and t in template and t not in named.values()]
    config: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(context_length or _gguf_field(reader, "llama.context_length", 2048)),
        "vocab_size": len(tokens),
        "added_tokens_decoder": {
            str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for t in specials
        },
        "additional_special_tokens": extra,
        **named,
    }
    if template:
        config["chat_template"] = template
        (out / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    write_json(out / TOKENIZER_CONFIG, config)
    write_json(out / SPECIAL_TOKENS_MAP, {**named, "additional_special_tokens": extra})
    write_json(out / "vocab.json", vocab)
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return {"tokenizer_class": "GPT2Tokenizer", "pre_tokenizer": pre, "vocab": len(tokens),
            "special_tokens": len(specials)}


def _pre_tokenizer_from_json(spec: dict[str, Any]) -> Any:
    from tokenizers import pre_tokenizers

    if spec["type"] == "Sequence":
        return pre_tokenizers.Sequence([_pre_tokenizer_from_json(s) for s in spec["pretokenizers"]])
    if spec["type"] == "Digits":
        return pre_tokenizers.Digits(individual_digits=spec["individual_digits"])
    if spec["type"] == "ByteLevel":
        return pre_tokenizers.ByteLevel(add_prefix_space=spec["add_prefix_space"], trim_offsets=spec["trim_offsets"],
                                        use_regex=spec["use_regex"])
    raise ValueError(f"unknown pre-tokenizer {spec['type']}")


# --------------------------------------------------------------------------- fixes as JSON edits


def strip_bos_from_post_processor(tokenizer_json: dict[str, Any], bos: str) -> bool:
    """Drop a bos the post-processor would add (the chat template writes it); True if one was dropped."""
    changed = False
    stack = [tokenizer_json.get("post_processor")]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if node.get("type") == "Sequence":
            stack.extend(node.get("processors", []))
        if node.get("type") != "TemplateProcessing":
            continue
        for key in ("single", "pair"):
            pieces = node.get(key, [])
            kept = [p for p in pieces if p.get("SpecialToken", {}).get("id") != bos]
            if len(kept) != len(pieces):
                node[key] = kept
                changed = True
        if changed:
            node.get("special_tokens", {}).pop(bos, None)
    return changed


def fix_tokenizer_files(
    model_dir: Path, *, eos: str | None, drop_bos: bool, pad: str | None, max_length: int | None,
    chat_template: str,
) -> None:
    """Apply the build's tokenizer fixes to the files in `model_dir`, touching only the keys concerned.

    `eos`/`pad`: new token strings (None keeps them); `drop_bos`: the tokenizer must not add a
    bos (``add_bos_token`` false and no bos in the post-processor); `max_length`: the context;
    the chat template goes to ``chat_template.jinja`` and ``tokenizer_config.json`` (readers
    differ in which they look at), identical in both.
    """
    config_path = model_dir / TOKENIZER_CONFIG
    config = read_json(config_path)
    special_map = read_json(model_dir / SPECIAL_TOKENS_MAP)
    for key, value in (("eos_token", eos), ("pad_token", pad)):
        if value is not None:
            config[key] = value
            if special_map:
                special_map[key] = value
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):  # stale ids would contradict the tokens
        config.pop(key, None)
    if drop_bos:
        config["add_bos_token"] = False
        tokenizer_json = read_json(model_dir / TOKENIZER_JSON)
        bos = config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        if isinstance(bos, str) and strip_bos_from_post_processor(tokenizer_json, bos):
            (model_dir / TOKENIZER_JSON).write_text(json.dumps(tokenizer_json, ensure_ascii=False, indent=2) + "\n",
                                                   encoding="utf-8")
    if max_length is not None:
        config["model_max_length"] = max_length
    config["chat_template"] = chat_template
    (model_dir / "chat_template.json").unlink(missing_ok=True)
    (model_dir / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    write_json(config_path, config)
    if special_map:
        write_json(model_dir / SPECIAL_TOKENS_MAP, special_map)


def portable_model_config(model_dir: Path) -> list[str]:
    """Add the pre-5.x spelling of the RoPE settings to ``config.json`` so transformers 4.x reads the same model.

    transformers 5 writes ``rope_parameters``; 4.x ignores that key and would fall back to its
    default ``rope_theta`` (10000), silently changing every position. Models whose layer types
    rotate differently (Gemma 3: ``{"full_attention": {...}, "sliding_attention": {...}}``) were
    spelt in 4.x as the full-attention settings plus ``rope_local_base_freq`` for the sliding
    layers. Returns the keys added.
    """
    path = model_dir / "config.json"
    config = read_json(path)
    rope = config.get("rope_parameters")
    added: list[str] = []
    if isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values()) and "full_attention" in rope:
        local = rope.get("sliding_attention", {}).get("rope_theta")
        if local is not None and "rope_local_base_freq" not in config:
            config["rope_local_base_freq"] = local
            added.append("rope_local_base_freq")
        rope = rope["full_attention"]
    if isinstance(rope, dict) and "rope_theta" in rope:
        if "rope_theta" not in config:
            config["rope_theta"] = rope["rope_theta"]
            added.append("rope_theta")
        if "rope_scaling" not in config:
            extra = {k: v for k, v in rope.items() if k != "rope_theta"}
            config["rope_scaling"] = None if extra.get("rope_type", "default") == "default" else extra
            added.append("rope_scaling")
    if added:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return added
