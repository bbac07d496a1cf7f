"""xgrammar against llguidance on this machine: schema compile time, mask time per step, JSON Schema coverage.

Run: ``python -m benchmarks.grammar_engines --tokenizer DIR [--tokenizer DIR2 ...]`` (each DIR a Hugging Face
fast tokenizer: tokenizer.json + tokenizer_config.json). llguidance is a dependency of the toolkit; xgrammar
is measured when it can be imported (it is not installed by the toolkit: its wheel requires torch), e.g.
``pip install --target /tmp/gx --no-deps xgrammar==0.2.8 apache-tvm-ffi`` and ``PYTHONPATH=/tmp/gx`` with the
build venv (which has torch). Prints one JSON object; the README's comparison table is its output.

Mask time is the engine's own work for one decode step of one sequence: compute the allowed-token
bitmask into a preallocated int32 buffer, then advance by the sampled token. The walk follows a
valid instance of the schema, tokenized by the model's tokenizer, so every step is a real step of
a constrained generation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# The bench row's schema (benchmarks/bench_structured.py uses the same): nested objects, enums, arrays,
# numbers. Strings, numbers and arrays are bounded, as a production schema should be: a small model
# otherwise fills a string until max_tokens.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "category": {"type": "string", "enum": ["fruit", "vegetable", "grain", "dairy", "meat"]},
        "price": {"type": "number", "minimum": 0, "maximum": 1000},
        "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "origin": {
            "type": "object",
            "properties": {"country": {"type": "string", "maxLength": 40},
                           "region": {"type": "string", "maxLength": 40}},
            "required": ["country", "region"],
            "additionalProperties": False,
        },
        "ratings": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5}, "maxItems": 5},
    },
    "required": ["name", "category", "price", "in_stock", "tags", "origin", "ratings"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Granny Smith apple", "category": "fruit", "price": 1.25, "in_stock": True,
            "tags": ["green", "sour", "crisp"], "origin": {"country": "Australia", "region": "New South Wales"},
            "ratings": [4, 5, 3, 4]}

# One schema per JSON Schema feature: does the engine accept it (compile without error)?
FEATURES: dict[str, dict[str, Any]] = {
    "enum/const": {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"const": 3}}},
    "nested objects + required": {"type": "object", "properties": {"o": {"type": "object", "properties": {
        "p": {"type": "integer"}}, "required": ["p"]}}, "required": ["o"]},
    "arrays minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "string minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 8},
    "string pattern": {"type": "string", "pattern": "^[a-z]+-[0-9]{3}$"},
    "string format (date-time, email, uuid)": {"type": "object", "properties": {
        "t": {"type": "string", "format": "date-time"}, "e": {"type": "string", "format": "email"},
        "u": {"type": "string", "format": "uuid"}}},
    "number minimum/maximum": {"type": "number", "minimum": 0, "maximum": 10},
    "integer exclusiveMinimum / multipleOf": {"type": "integer", "exclusiveMinimum": 0, "multipleOf": 5},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"type": "object", "properties": {"b": {"type": "string"}}}]},
    "$ref/$defs (recursive)": {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}}},
        "$ref": "#/$defs/node"},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
    "prefixItems (tuples)": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                             "items": False},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "not": {"not": {"type": "string"}},
    "if/then/else": {"type": "object", "if": {"properties": {"a": {"const": 1}}},
                     "then": {"required": ["b"]}, "else": {"required": ["c"]}},
}


def _stats(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {"mean_us": round(1e6 * statistics.fmean(ordered), 1),
            "p50_us": round(1e6 * ordered[len(ordered) // 2], 1),
            "p99_us": round(1e6 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1)}


def _instance_ids(tokenizer: Any) -> list[int]:
    return list(tokenizer(json.dumps(INSTANCE), add_special_tokens=False)["input_ids"])


def measure_llguidance(tokenizer_dir: Path, repeats: int) -> dict[str, Any]:
    import llguidance
    import llguidance.numpy as llnp
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    start = time.perf_counter()
    tok = llguidance.LLTokenizer((tokenizer_dir / "tokenizer.json").read_text(), n_vocab=len(hf),
                                 eos_token=hf.eos_token_id)
    tokenizer_s = time.perf_counter() - start
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    compile_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(tok, grammar)
        llnp.fill_next_token_bitmask(matcher, llnp.allocate_token_bitmask(1, tok.vocab_size))  # first mask too
        compile_s.append(time.perf_counter() - start)
        assert not matcher.is_error(), matcher.get_error()
    ids = _instance_ids(hf)
    steps, applied = [], []
    for _ in range(repeats):
        matcher = llguidance.LLMatcher(tok, grammar)
        mask = llnp.allocate_token_bitmask(1, tok.vocab_size)
        for token in ids:
            start = time.perf_counter()
            llnp.fill_next_token_bitmask(matcher, mask)
            assert matcher.consume_token(token), matcher.get_error()
            steps.append(time.perf_counter() - start)
            applied.append(apply_mask_cost(mask[0]))
        assert matcher.is_accepting()
    features = {}
    for name, schema in FEATURES.items():
        ok, warnings = _llg_compiles(llguidance, tok, schema)
        features[name] = "yes" if ok and not warnings else ("partial: " + warnings if ok else "no: " + warnings)
    return {"vocab": tok.vocab_size, "tokenizer_load_s": round(tokenizer_s, 3),
            "compile_ms": round(1000 * statistics.median(compile_s), 2), "mask_per_step": _stats(steps),
            "numpy_apply_mask_per_step": _stats(applied), "steps": len(ids), "features": features}


def _llg_compiles(llguidance: Any, tok: Any, schema: dict[str, Any]) -> tuple[bool, str]:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    except Exception as err:  # noqa: BLE001 - the error text is the result
        return False, str(err).splitlines()[0][:100]
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
    return not is_error, "; ".join(messages)[:100]


def measure_xgrammar(tokenizer_dir: Path, repeats: int) -> dict[str, Any]:
    import xgrammar
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))
    tokenizer_s = time.perf_counter() - start
    compile_s = []
    for _ in range(repeats):
        compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
        matcher = xgrammar.GrammarMatcher(compiled)
        matcher.fill_next_token_bitmask(xgrammar.allocate_token_bitmask(1, info.vocab_size))
        compile_s.append(time.perf_counter() - start)
    ids = _instance_ids(hf)
    steps = []
    for _ in range(repeats):
        matcher = xgrammar.GrammarMatcher(compiled)
        mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
        for token in ids:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            assert matcher.accept_token(token)
            steps.append(time.perf_counter() - start)
        assert matcher.is_terminated() or matcher.accept_token(hf.eos_token_id)
    features = {}
    for name, schema in FEATURES.items():
        try:
            with _stderr_captured() as captured:
                xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(schema))
            warning = captured.read().strip()
            last = warning.splitlines()[-1].split("Warning: ")[-1][:100] if warning else ""
            features[name] = "yes" if not warning else "partial: " + last
        except Exception as err:  # noqa: BLE001 - the error text is the result
            features[name] = "no: " + str(err).splitlines()[0][:100]
    return {"vocab": info.vocab_size, "tokenizer_load_s": round(tokenizer_s, 3),
            "compile_ms": round(1000 * statistics.median(compile_s), 2), "mask_per_step": _stats(steps),
            "steps": len(ids), "features": features}


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Any]:
    """What native code writes to fd 2 meanwhile (xgrammar warns there when it ignores a keyword)."""
    sink = tempfile.TemporaryFile(mode="w+")
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield sink
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sink.seek(0)


def apply_mask_cost(mask: np.ndarray) -> float:
    """Seconds the serving path takes to apply one row's bitmask to fresh logits (toolkit.runtime.grammar)."""
    from toolkit.runtime.grammar import apply_bitmask

    logits = np.random.default_rng(0).standard_normal(mask.size * 32).astype(np.float32)
    start = time.perf_counter()
    apply_bitmask(logits, mask)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, action="append", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    out: dict[str, Any] = {}
    for tokenizer_dir in args.tokenizer:
        row: dict[str, Any] = {"llguidance": measure_llguidance(tokenizer_dir, args.repeats)}
        try:
            row["xgrammar"] = measure_xgrammar(tokenizer_dir, args.repeats)
        except ImportError as err:
            row["xgrammar"] = f"not measured: {err}"
        out[tokenizer_dir.name] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
