"""Stage ``base_model``: turn the configured base into a normalised Hugging Face model directory.

Three kinds of base: the embedded SmolLM2-135M-Instruct GGUF (converted once with transformers'
GGUF loader), a local Hugging Face directory (weights linked, metadata rewritten), or a hub id
(only with ``model.allow_hub_download``). Every base then gets the same normalisation, which fixes
the two known defects of the GGUF conversion: eos must be the template's end-of-turn token
(``<|im_end|>``), and the tokenizer must not add a bos the chat template already writes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from toolkit.buildsys.config import EMBEDDED_MODEL, BuildConfig
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.errors import ConfigError, StageError, ToolkitError
from toolkit.files import sha256_file, sha256_text
from toolkit.model_io.embedded_model import embedded_gguf_path, gguf_to_hf
from toolkit.model_io.families import check_architecture
from toolkit.model_io.modeling import chat_template_of, load_tokenizer, stop_token_ids
from toolkit.model_io.tokenizer_files import (
    CHAT_TEMPLATE_FILE,
    TOKENIZER_CONFIG,
    fix_tokenizer_files,
    portable_model_config,
    read_json,
    write_json,
)
from toolkit.quality.portability import (
    V5_ONLY_CLASSES,
    jinja_render,
    portability_gate,
    probe_texts,
    special_token_vars,
    tokenizer_only_problems,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MODEL_DIR = "model"
# The class every transformers version (4.x, 5.x, so vLLM too) reads as tokenizer.json says, without re-deriving it.
GENERIC_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def drop_gguf_vocab_copy(model_dir: Path) -> None:
    """Remove the ``tokenizer.model`` a GGUF conversion saves: it is the whole GGUF file again (98 MB),
    not a sentencepiece model, and ``tokenizer.json`` already carries the tokenizer."""
    vocab = model_dir / "tokenizer.model"
    if vocab.is_file() and (model_dir / "tokenizer.json").is_file():
        with vocab.open("rb") as fh:
            if fh.read(4) == b"GGUF":
                vocab.unlink()


def link_hf_dir(src: Path, out: Path) -> None:
    """Hard-link (or copy) weight files and copy the rest: metadata is rewritten later, never in `src`."""
    if not (src / "config.json").is_file():
        raise ConfigError(f"model.base: {src} is not a Hugging Face model directory (no config.json)")
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        target = out / path.name
        if path.suffix in _WEIGHT_SUFFIXES:
            try:
                os.link(path, target)
                continue
            except OSError:
                pass  # another filesystem: fall back to a copy
        shutil.copy2(path, target)


def hub_snapshot(repo_id: str) -> Path:
    """Download a hub model (only reached with model.allow_hub_download)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja",
                                                               "*.txt"]))
    except Exception as err:  # network, auth, missing repo: all end the stage with one line
        raise StageError(f"could not download {repo_id!r} from the Hugging Face hub: {err}") from err


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase, template: str) -> str | None:
    """The special token the chat template writes right after an assistant reply, if any."""
    text = jinja_render(
        template, [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}], False,
        special_token_vars(tokenizer),
    )
    after = text[text.rindex("pong") + len("pong"):]
    specials = sorted(
        (t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True
    )
    return next((tok for tok in specials if after.startswith(tok)), None)


def _update_json(path: Path, updates: dict[str, Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def normalise_tokenizer_class(model_dir: Path) -> list[str]:
    """Name a tokenizer class that every reader loads as ``tokenizer.json`` says; return the fix, if any.

    Two kinds of label break that: ``TokenizersBackend``, which transformers 5 writes when it saves any
    generic fast tokenizer (a user's own SFT checkpoint) and which transformers 4.x cannot load; and a
    family class that transformers 5 re-derives from the vocabulary instead of reading tokenizer.json
    (Phi-3's ``LlamaTokenizer`` with ``legacy: false``: the tokenizer files alone then encode the text
    after a special token differently from the same files next to a config.json). Both become
    ``PreTrainedTokenizerFast``, which reads tokenizer.json verbatim in 4.x and 5.x.
    """
    path = model_dir / TOKENIZER_CONFIG
    config = read_json(path)
    named = config.get("tokenizer_class")
    if named == GENERIC_TOKENIZER_CLASS:
        return []
    if named in V5_ONLY_CLASSES:
        reason = "transformers 4.x cannot load it"
    else:
        problems = tokenizer_only_problems(model_dir, probe_texts(model_dir))
        if not problems:
            return []
        reason = f"read from its files alone it disagrees with tokenizer.json: {problems[0]}"
    write_json(path, {**config, "tokenizer_class": GENERIC_TOKENIZER_CLASS})
    return [f"tokenizer_class {named} -> {GENERIC_TOKENIZER_CLASS} ({reason})"]


def stop_ids_after_fix(old: Any, old_eos: int | None, new_eos: int | None, template_starts: str,
                       tokenizer: PreTrainedTokenizerBase) -> int | list[int] | None:
    """The eos id(s) for config.json and generation_config.json after the eos fix.

    Every end id the model already had stays (Llama 3's <|end_of_text|>, <|eom_id|> and <|eot_id|>; Phi-3's
    <|endoftext|> beside <|end|>), the tokenizer's eos comes first; an old eos that the chat template writes at
    the start of a turn (the GGUF conversion's <|im_start|>) is dropped: it never ends a reply.
    """
    ids = [int(i) for i in (old if isinstance(old, list) else [old]) if i is not None]
    if old_eos is not None and old_eos != new_eos and str(tokenizer.convert_ids_to_tokens(old_eos)) in template_starts:
        ids = [i for i in ids if i != old_eos]
    merged = ([new_eos] if new_eos is not None else []) + [i for i in ids if i != new_eos]
    return None if not merged else merged[0] if len(merged) == 1 else merged


def normalise_model_dir(model_dir: Path) -> dict[str, Any]:
    """Normalise tokenizer, config and generation config of `model_dir` in place; return facts for metrics.

    Fixes, each an edit of the JSON keys concerned (the tokenizer files are otherwise the
    source's own): a tokenizer class every reader loads alike; eos becomes the template's
    end-of-turn token; a tokenizer that adds a bos the template already writes stops adding it;
    a missing pad becomes eos; the tokenizer's maximum length is capped at the model's positions;
    the chat template is written to both places readers look for it; config.json gets the pre-5.x
    RoPE keys; every end id the model had stays a stop.
    """
    fixes = normalise_tokenizer_class(model_dir)
    tokenizer = load_tokenizer(model_dir)
    template = chat_template_of(tokenizer)
    specials = special_token_vars(tokenizer)
    old_eos_id = tokenizer.eos_token_id
    eos = eot = end_of_turn_token(tokenizer, template)
    if eot is None or tokenizer.eos_token == eot:
        eos = None
    else:
        fixes.append(f"eos_token {tokenizer.eos_token!r} -> {eot!r}")
    bos = tokenizer.bos_token
    prompt = jinja_render(template, [{"role": "user", "content": "ping"}], True, specials)
    starts_with_bos = bos is not None and prompt.startswith(bos)
    adds_bos = bos is not None and tokenizer("ping")["input_ids"][:1] == [tokenizer.bos_token_id]
    # The template already writes the bos token; adding another would shift every prompt.
    drop_bos = starts_with_bos and (adds_bos or bool(getattr(tokenizer, "add_bos_token", False)))
    if drop_bos:
        fixes.append("add_bos_token True -> False")
    pad = None
    if tokenizer.pad_token is None and (eos or tokenizer.eos_token) is not None:
        pad = eos or tokenizer.eos_token
        fixes.append(f"pad_token None -> {pad!r}")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    context = int(config.get("max_position_embeddings") or 0) or None
    max_length = context if context and (tokenizer.model_max_length or 0) > context else None
    fix_tokenizer_files(model_dir, eos=eos, drop_bos=drop_bos, pad=pad, max_length=max_length,
                        chat_template=template)
    added = portable_model_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    stops: list[int] = []
    for name in ("config.json", "generation_config.json"):  # copies (never links): safe to rewrite
        current = read_json(model_dir / name)
        ids = {
            "eos_token_id": stop_ids_after_fix(current.get("eos_token_id"), old_eos_id, tokenizer.eos_token_id,
                                               prompt, tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        _update_json(model_dir / name, {k: v for k, v in ids.items() if v is not None})
        if name == "generation_config.json":
            stops = stop_token_ids(tokenizer, SimpleNamespace(eos_token_id=ids["eos_token_id"]))
    return {
        "fixes": fixes,
        "config_keys_added": added,  # so transformers 4.x reads the same RoPE settings
        "vocab": len(tokenizer),
        "context": context,
        "tokenizer_class": type(tokenizer).__name__,
        "eos_token": tokenizer.eos_token,
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        "chat_template_sha256": sha256_text(template),
        "stop_token_ids": stops,
    }


def count_parameters(model_dir: Path) -> int:
    """Parameters in the safetensors files, read from their headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = fh.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= int(dim)
                total += count
    return total


def materialise_base(base: str, allow_hub_download: bool, out: Path) -> str:
    """Write the configured base into `out` as a Hugging Face directory; return what it came from.

    A local directory's architecture is checked before anything is linked or converted.
    """
    if base == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        log.info("converting the embedded GGUF %s (about 20 s, once)", gguf.name)
        gguf_to_hf(gguf, out)
        return f"gguf:{gguf}"
    if base.startswith("embedded:"):
        raise ConfigError(f"model.base: unknown embedded model {base!r}; the embedded one is {EMBEDDED_MODEL!r}")
    local = Path(base).expanduser()
    if local.exists():
        if (local / "config.json").is_file():
            check_architecture(local / "config.json")
        link_hf_dir(local, out)
        drop_gguf_vocab_copy(out)
        return f"dir:{local.resolve()}"
    if not _HUB_ID.match(base):
        raise ConfigError(f"model.base: {base!r} is neither {EMBEDDED_MODEL!r}, an existing directory nor a hub id")
    if not allow_hub_download:
        raise ConfigError(
            f"model.base: {base!r} is not a local directory; to download it from the Hugging Face hub set "
            "model.allow_hub_download: true (needs network), or point model.base at a local model directory"
        )
    link_hf_dir(hub_snapshot(base), out)
    return f"hub:{base}"


def base_files(config: BuildConfig) -> dict[str, Path]:
    """The files the base model is made of, by name: the embedded GGUF, or a local directory's files."""
    base = config.model.base
    if base == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        return {gguf.name: gguf}
    local = Path(base).expanduser()
    if local.is_dir():
        return {p.name: p for p in sorted(local.iterdir()) if p.is_file() and not p.name.startswith(".")}
    return {}


def cache_inputs(config: BuildConfig) -> dict[str, Any]:
    """The base model's files by content (weights, config, tokenizer, template), so an in-place edit reruns it.

    A checkpoint directory rewritten in place (``model.base: ./checkpoints/latest``) keeps its name and
    may keep its sizes and times; only the contents tell. A hub id is keyed on its name: the hub's
    revision is not known before the download.
    """
    try:
        return {"files": {name: sha256_file(path) for name, path in base_files(config).items()}}
    except ToolkitError:
        return {}  # no embedded model installed: the stage itself says so, in one line


def run(ctx: StageContext) -> StageResult:
    """Materialise, check and normalise the base model into ``<stage>/model``; gate its files' portability."""
    out = ctx.out_dir / MODEL_DIR
    started = time.perf_counter()
    source = materialise_base(ctx.config.model.base, ctx.config.model.allow_hub_download, out)
    conversion_s = time.perf_counter() - started
    architecture = check_architecture(out / "config.json")
    facts = normalise_model_dir(out)
    if facts["context"] and ctx.config.model.context_length > facts["context"]:
        log.warning("model.context_length %d exceeds the model's %d positions",
                    ctx.config.model.context_length, facts["context"])
    # Every check that needs no fine-tuned weights runs here, minutes before the merge would find the problem.
    gate = portability_gate(out, facts["stop_token_ids"], name="portable_base_model_files")
    return StageResult(
        metrics={
            "source": source,
            "architecture": architecture.name,
            "params": count_parameters(out),
            "conversion_s": round(conversion_s, 2),
            **facts,
        },
        gates=[gate],
        artifacts={"model": MODEL_DIR, "chat_template": f"{MODEL_DIR}/{CHAT_TEMPLATE_FILE}"},
        note="; ".join(facts["fixes"]) or "no tokenizer fixes needed",
    )
