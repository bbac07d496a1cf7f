"""The portability gate: do other readers of a model directory see what the toolkit sees?

The toolkit reads its model directories with one transformers version; vLLM, TGI, llama.cpp's
converter and older or newer transformers read the same files differently when the files are
ambiguous. The gate checks, without trusting the installed transformers alone:

- labels: ``tokenizer_config.json``'s ``tokenizer_class`` must fit ``tokenizer.json`` (a byte-level
  BPE labelled as a SentencePiece Llama tokenizer is re-derived, and garbled, by transformers 5.0
  to 5.19 and so by vLLM); the decoder of a byte-level BPE must be plain ``ByteLevel`` (a hybrid
  with SentencePiece steps makes llama.cpp's converter write an SPM vocabulary); the class must
  exist in transformers 4.x as well as 5.x;
- tokens: on the probe texts, the raw ``tokenizers`` library reading ``tokenizer.json`` alone gives
  the same ids and decoded text as the toolkit's tokenizer, and loading it logs no warning;
- template: the chat template rendered by plain jinja2 the way transformers, vLLM and TGI set it
  up equals the toolkit's rendering, and the copies of the template agree;
- stops and config: ``generation_config.json`` stops on every id the gateway stops on, and
  ``config.json`` spells RoPE settings for transformers 4.x too.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from toolkit.buildsys.report import GateResult
from toolkit.model_io.tokenizer_files import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG, TOKENIZER_JSON, read_json
from toolkit.quality.golden import golden_conversations

Message = dict[str, Any]

# Classes that mean a SentencePiece (Metaspace) tokenizer to transformers: re-derived as such.
SENTENCEPIECE_CLASSES = {
    "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast", "GemmaTokenizer",
    "GemmaTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "MistralTokenizer",
}
# Classes only transformers 5.x knows.
V5_ONLY_CLASSES = {"TokenizersBackend"}
_SPM_DECODER_STEPS = {"ByteFallback", "Fuse", "Metaspace", "Strip"}

# Texts every reader must tokenize alike: plain, Chinese, emoji, whitespace runs, digits, special tokens.
PROBE_TEXTS = [
    "Hello world, how are you?",
    " Hello,  world: a leading space, then two",  # SentencePiece readers differ on leading spaces
    "  \n  indented after a newline",
    "蓝峰电子的退货期限是多少天？请在30天内申请。",
    "Happy birthday 🎉🎂! 👋🏽 — ça va?",
    "two  spaces,   three, \ttab\n\nblank line\n\n\n  indented\r\nCRLF",
    "Order #12345 costs $199.99 on 2026-11-26 (x² ５６).",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]
# Conversations whose rendering every reader must agree on.
PROBE_CONVERSATIONS: list[list[Message]] = [
    *golden_conversations(),
    [{"role": "system", "content": "You are Bluepeak's support assistant."},
     {"role": "user", "content": "When are you open?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "  Spaces  and\n\nnewlines  "}],
]


# --------------------------------------------------------------------------- plain jinja2


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str) -> Any:
    """The template compiled once per source text (a large template takes a tenth of a second or more to compile,
    and the portability checks render each one dozens of times), as transformers caches its own."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def jinja_render(template: str, messages: Sequence[Message], add_generation_prompt: bool,
                 special_tokens: dict[str, str] | None = None) -> str:
    """Render a chat template with plain jinja2, set up as transformers (and so vLLM) and TGI set it up:
    a sandboxed environment with ``trim_blocks``/``lstrip_blocks``, loop controls, ``raise_exception``,
    ``strftime_now`` and a ``tojson`` that keeps non-ASCII text; the special tokens as variables."""
    return _compiled_template(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **(special_tokens or {})
    )


# --------------------------------------------------------------------------- checks on the files


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every component of a tokenizer.json pipeline (Sequence members included)."""
    if not isinstance(node, dict):
        return []
    out = [node]
    for key in ("pretokenizers", "decoders", "processors", "normalizers"):
        for child in node.get(key, []) or []:
            out.extend(_walk(child))
    return out


def is_byte_level(tokenizer_json: dict[str, Any]) -> bool:
    """A byte-level BPE (GPT-2 family): ByteLevel in the pre-tokenizer or the decoder."""
    parts = _walk(tokenizer_json.get("pre_tokenizer")) + _walk(tokenizer_json.get("decoder"))
    return any(p.get("type") == "ByteLevel" for p in parts)


def label_problems(model_dir: Path) -> list[str]:
    """Static checks of tokenizer_config.json against tokenizer.json (no transformers involved)."""
    config = read_json(model_dir / TOKENIZER_CONFIG)
    tokenizer = read_json(model_dir / TOKENIZER_JSON)
    if not tokenizer:
        return [f"{TOKENIZER_JSON} is missing"]
    cls = str(config.get("tokenizer_class") or "")
    decoder = [d.get("type") for d in _walk(tokenizer.get("decoder"))]
    problems = []
    if is_byte_level(tokenizer):
        if cls.removesuffix("Fast") + "Fast" in {c.removesuffix("Fast") + "Fast" for c in SENTENCEPIECE_CLASSES}:
            problems.append(
                f"tokenizer_config.json names {cls} (a SentencePiece tokenizer) but tokenizer.json is a byte-level "
                "BPE: transformers 5.0-5.19 (and vLLM) re-derive a SentencePiece tokenizer from it and garble text; "
                "name the family's byte-level class (e.g. GPT2Tokenizer)"
            )
        if not cls:
            problems.append("tokenizer_config.json names no tokenizer_class: readers fall back to the model type's "
                            "default class, which for Llama models is a SentencePiece tokenizer")
        hybrid = sorted(_SPM_DECODER_STEPS.intersection(decoder)) + (
            ["Replace ▁"] if any(d.get("type") == "Replace" and "▁" in json.dumps(d.get("pattern"), ensure_ascii=False)
                                 for d in _walk(tokenizer.get("decoder"))) else []
        )
        if hybrid:
            problems.append(f"tokenizer.json's decoder mixes SentencePiece steps ({', '.join(hybrid)}) into a "
                            "byte-level BPE: llama.cpp's converter reads it as SentencePiece; use a ByteLevel decoder")
        if tokenizer.get("model", {}).get("byte_fallback"):
            problems.append("tokenizer.json's BPE has byte_fallback on, a SentencePiece feature, in a byte-level BPE")
    if cls in V5_ONLY_CLASSES:
        problems.append(f"tokenizer_config.json names {cls}, which transformers 4.x cannot load; name the family's "
                        "tokenizer class")
    template_file = model_dir / CHAT_TEMPLATE_FILE
    in_config = config.get("chat_template")
    if template_file.is_file() and isinstance(in_config, str) and in_config != template_file.read_text("utf-8"):
        problems.append("the chat template in tokenizer_config.json differs from chat_template.jinja")
    return problems


def config_problems(model_dir: Path, stop_ids: Sequence[int]) -> list[str]:
    """generation_config.json must stop where the gateway stops; config.json must read the same in 4.x."""
    problems = []
    generation = read_json(model_dir / "generation_config.json")
    eos = generation.get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    missing = [i for i in stop_ids if i not in eos_ids]
    if missing:
        problems.append(f"generation_config.json eos_token_id {eos!r} lacks the stop id(s) {missing}: vLLM and "
                        "transformers' generate would run past the end of a reply")
    config = read_json(model_dir / "config.json")
    if isinstance(config.get("rope_parameters"), dict) and "rope_theta" not in config:
        problems.append("config.json has rope_parameters but no rope_theta: transformers 4.x would use its default")
    return problems


def _load_quietly(model_dir: Path) -> tuple[Any, list[str]]:
    """The toolkit's tokenizer for `model_dir`, and every warning transformers logged while loading it."""
    from toolkit.model_io.modeling import load_tokenizer

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage().splitlines()[0])

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        tokenizer = load_tokenizer(model_dir)
    finally:
        logger.removeHandler(handler)
    return tokenizer, records


def token_problems(model_dir: Path, tokenizer: Any, texts: Sequence[str], who: str = "toolkit") -> list[str]:
    """The raw tokenizers library (tokenizer.json alone) must give `tokenizer`'s ids and text.

    A byte-level BPE must also give back every text exactly (SentencePiece tokenizers may not).
    `who` names `tokenizer` in the problems.
    """
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model_dir / TOKENIZER_JSON))
    round_trip = is_byte_level(read_json(model_dir / TOKENIZER_JSON))
    problems = []
    for text in texts:
        ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        theirs = raw.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                         min(len(ours), len(theirs)))
            problems.append(f"ids differ for {text[:40]!r} at token {first}: {who} {ours[first:first + 4]} vs "
                            f"tokenizers {theirs[first:first + 4]}")
            continue
        for skip in (True, False):
            a = tokenizer.decode(ours, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            b = raw.decode(theirs, skip_special_tokens=skip)
            if a != b:
                problems.append(f"{who}'s decoded text differs for {text[:40]!r} (skip_special_tokens={skip}): "
                                f"{a[:40]!r} vs {b[:40]!r}")
        if round_trip and tokenizer.decode(ours, skip_special_tokens=False, clean_up_tokenization_spaces=False) != text:
            problems.append(f"{text[:40]!r} does not survive encode/decode")
    return problems


def tokenizer_only_problems(model_dir: Path, texts: Sequence[str]) -> list[str]:
    """The tokenizer files alone must encode like tokenizer.json.

    The repository ships them without config.json (``tokenizer/``), and vLLM's ``--tokenizer`` or a
    user's ``AutoTokenizer`` may read them so. transformers 5 picks the tokenizer class from config.json's
    model type when there is one and from tokenizer_config.json's ``tokenizer_class`` when there is not,
    and some classes re-derive the tokenizer from the vocabulary instead of reading tokenizer.json.
    """
    import tempfile

    from toolkit.model_io.tokenizer_files import copy_tokenizer_files

    with tempfile.TemporaryDirectory(prefix="tokenizer-only-") as tmp:
        copy_tokenizer_files(model_dir, Path(tmp))
        tokenizer, _ = _load_quietly(Path(tmp))
        who = f"the tokenizer files alone ({type(tokenizer).__name__})"
        return token_problems(model_dir, tokenizer, texts, who=who)


def probe_texts(model_dir: Path) -> list[str]:
    """The probe texts plus the probe conversations rendered by the directory's chat template (with special tokens).

    Read from the files as they are (no tokenizer loaded): the template from ``chat_template.jinja`` or
    ``tokenizer_config.json``, the special tokens it may name from ``tokenizer_config.json``.
    """
    config = read_json(model_dir / TOKENIZER_CONFIG)
    template_path = model_dir / CHAT_TEMPLATE_FILE
    template = template_path.read_text("utf-8") if template_path.is_file() else config.get("chat_template")
    specials = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            specials[key] = value
    texts = list(PROBE_TEXTS)
    if isinstance(template, str):
        texts += [jinja_render(template, conv, True, specials) for conv in PROBE_CONVERSATIONS]
    return texts


def special_token_vars(tokenizer: Any) -> dict[str, str]:
    """The special tokens a chat template may refer to, as transformers passes them."""
    return {k: v for k in ("bos_token", "eos_token", "pad_token", "unk_token") if (v := getattr(tokenizer, k, None))}


def template_problems(tokenizer: Any, template: str, conversations: Sequence[Sequence[Message]]) -> list[str]:
    """Plain jinja2 must render every conversation as the toolkit does, with and without a generation prompt."""
    specials = special_token_vars(tokenizer)
    problems = []
    for conversation in conversations:
        for generation in (True, False):
            ours = tokenizer.apply_chat_template(list(conversation), chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation)
            theirs = jinja_render(template, conversation, generation, specials)
            if ours != theirs:
                problems.append(f"template renders differently in plain jinja2 for "
                                f"{conversation[-1]['content'][:30]!r} (generation prompt {generation})")
    return problems


def portability_gate(model_dir: Path, stop_ids: Sequence[int], *, name: str = "portable_model_files") -> GateResult:
    """Every check above on one model (or tokenizer) directory, as one blocking gate."""
    problems = label_problems(model_dir)
    tokenizer, warnings = _load_quietly(model_dir)
    problems += [f"loading the tokenizer logs a warning: {w}" for w in warnings]
    template_path = model_dir / CHAT_TEMPLATE_FILE
    template = template_path.read_text("utf-8") if template_path.is_file() else tokenizer.chat_template
    texts = list(PROBE_TEXTS)
    if isinstance(template, str):
        problems += template_problems(tokenizer, template, PROBE_CONVERSATIONS)
        texts += [jinja_render(template, conv, True, special_token_vars(tokenizer)) for conv in PROBE_CONVERSATIONS]
    else:
        problems.append("no chat template")
    problems += token_problems(model_dir, tokenizer, texts)
    problems += tokenizer_only_problems(model_dir, texts)
    if (model_dir / "generation_config.json").is_file() or (model_dir / "config.json").is_file():
        problems += config_problems(model_dir, stop_ids)
    return GateResult(
        name=name, passed=not problems, value=len(problems), threshold=0,
        detail="; ".join(problems) or (
            f"raw tokenizers = toolkit ids and text (and = the tokenizer files alone) on "
            f"{len(PROBE_TEXTS) + len(PROBE_CONVERSATIONS)} texts; "
            f"plain jinja2 = toolkit template on {len(PROBE_CONVERSATIONS)} conversations; labels, stops, config ok"
        ),
    )
