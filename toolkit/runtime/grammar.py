"""Grammar-constrained decoding: the request's grammar spec, compiled by llguidance, one matcher per sequence.

A request may carry a grammar spec (:data:`toolkit.repository.contract.GRAMMAR`, a JSON document):

- ``{"type": "json_object"}``: any JSON object;
- ``{"type": "json_schema", "schema": {...}}``: JSON valid against the schema;
- ``{"type": "tool_calls", "tools": [{"name", "parameters"}], "begin", "end", "arguments_key",
  "required", "parallel"}``: function calls written as ``begin {"name": .., <arguments_key>: {..}} end``
  (hermes: ``<tool_call>\\n`` .. ``\\n</tool_call>``). ``required``: the reply is one call (or, with
  ``parallel``, several separated by newlines) and nothing else; otherwise free text in which each
  ``begin`` starts a call that must match a tool's parameters (llguidance's lazy lexemes, the
  equivalent of xgrammar's structural tags).

JSON is compact with the separators ``json.dumps`` writes (``", "``, ``": "``): no free whitespace,
which a small model would otherwise fill until ``max_tokens``. llguidance (MIT, no dependencies) was
chosen over xgrammar by measurement (README, ``benchmarks/grammar_engines.py``); its wheel needs no
torch, which the serving install does not have. Compiling runs in a worker thread with a time
limit and is cached by the spec's hash; each sequence takes a copy of the compiled matcher.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import numpy as np

from toolkit.repository.spec import DEFAULT_LIMITS

# JSON as json.dumps writes it; no other whitespace (see the module docstring).
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_ERROR_CHARS = 400
DEFAULT_CACHE_SIZE = 128


class GrammarError(ValueError):
    """The grammar spec is invalid, unsupported, or too costly; the message says which and why."""


def _json_grammar(schema: dict[str, Any]) -> str:
    return str(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS))  # type: ignore[arg-type]


def _call_schema(tools: Sequence[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    """A call of any one of `tools`: ``{"name": <const>, <arguments_key>: <its parameters>}``."""
    calls = []
    for tool in tools:
        name, parameters = tool.get("name"), tool.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(name, str) or not name or not isinstance(parameters, dict):
            raise GrammarError("each tool needs a non-empty string 'name' and an object 'parameters'")
        calls.append({"type": "object", "properties": {"name": {"const": name}, arguments_key: parameters},
                      "required": ["name", arguments_key], "additionalProperties": False})
    if not calls:
        raise GrammarError("a tool_calls grammar needs at least one tool")
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**schema, "x-guidance": JSON_OPTIONS}


def _plain_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a Lark string literal


def token_literal(tokenizer: Any) -> Callable[[str], str]:
    """Lark for a literal as this tokenizer writes it: a piece that is one special token of the vocabulary
    (Qwen2.5's ``<tool_call>``, an added token) becomes a token reference ``<[id]>``, since llguidance never
    matches a special token's text byte for byte; the rest stays a string literal."""

    def literal(text: str) -> str:
        parts: list[str] = []
        plain: list[int] = []
        for token in tokenizer.tokenize_str(text):
            if tokenizer.is_special_token(token):
                if plain:
                    parts.append(json.dumps(tokenizer.decode_str(plain)))
                    plain = []
                parts.append(f"<[{token}]>")
            else:
                plain.append(token)
        if plain:
            parts.append(json.dumps(tokenizer.decode_str(plain)))
        return " ".join(parts)

    return literal


def _tool_calls_grammar(spec: dict[str, Any], lit: Callable[[str], str]) -> str:
    begin, end = str(spec.get("begin", "")), str(spec.get("end", ""))
    arguments_key = str(spec.get("arguments_key") or "arguments")
    call_json = "%json " + json.dumps(_call_schema(spec.get("tools") or [], arguments_key))
    parallel = bool(spec.get("parallel", True))
    if spec.get("required"):
        body = f"{lit(begin) if begin else ''} {call_json} {lit(end) if end else ''}"
        start = 'call ("\\n" call)*' if parallel else "call"
        lark = f"%llguidance {{}}\nstart: {start}\ncall: {body}\n"
    else:
        if not begin:
            raise GrammarError("a tool_calls grammar with free text needs a 'begin' string that starts a call")
        trigger = begin.strip() or begin
        rest = begin[begin.index(trigger) + len(trigger):]
        body = f"{lit(rest) if rest else ''} {call_json} {lit(end) if end else ''}"
        trigger_lark = lit(trigger)
        if trigger_lark.startswith("<[") and " " not in trigger_lark:
            # The trigger is one special token: free text cannot contain it, so text and calls alternate.
            calls = "(TEXT? call)*" if parallel else "(TEXT? call)?"
            lark = (f"%llguidance {{}}\nstart: {calls} TEXT?\ncall: {trigger_lark} {body}\n"
                    f"TEXT: /(.|\\n)+/\n")
        else:
            # Free text up to the trigger (a lazy lexeme: it ends at the trigger's first occurrence), then the
            # rest of `begin` and a constrained call (llguidance's StructTag grammar).
            calls = "call*" if parallel else "call?"
            lark = (f"%llguidance {{}}\nstart: {calls} TEXT\ncall_text[lazy]: TEXT {trigger_lark}\n"
                    f"call: call_text {body}\nTEXT: /(.|\\n)*/\n")
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


def spec_to_grammar(spec: Any, literal: Callable[[str], str] = _plain_literal) -> str:
    """The llguidance grammar of a spec (a parsed JSON document); GrammarError names what is wrong.
    `literal` writes a tool call's begin and end strings (:func:`token_literal` for a real tokenizer)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise GrammarError('a grammar spec is a JSON object with a "type"')
    kind = spec["type"]
    try:
        if kind == "json_object":
            return _json_grammar({"type": "object"})
        if kind == "json_schema":
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise GrammarError('a json_schema grammar needs "schema": a JSON Schema object')
            return _json_grammar(schema)
        if kind == "tool_calls":
            return _tool_calls_grammar(spec, literal)
    except ValueError as err:  # llguidance's own checks raise ValueError
        raise GrammarError(_short(str(err))) from None
    raise GrammarError(f"unknown grammar type {kind!r}; use json_object, json_schema or tool_calls")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def load_tokenizer(tokenizer_json: str, vocab_size: int, stop_token_ids: Sequence[int]) -> Any:
    """llguidance's view of the model's vocabulary: every id below `vocab_size` (the logits' width).

    `stop_token_ids` are the tokens that may end the reply once the grammar is complete.
    """
    stops = sorted(set(stop_token_ids))
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=stops or None)


def apply_bitmask(logits: np.ndarray, mask: np.ndarray) -> None:
    """Set the logits of every token the int32 bitmask row forbids to -inf, in place (1-D rows)."""
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little", count=logits.shape[-1]).view(bool)
    logits[~allowed] = -np.inf


class GrammarCompiler:
    """Compiles specs to matchers in a worker thread, with a time limit and a cache keyed by the spec's hash.

    :meth:`compile` returns a future of the compiled matcher; :meth:`matcher` gives each sequence its
    own copy. A spec that fails, or compiles slower than ``timeout_s``, fails the same way whenever
    it is sent again (the failure is cached), so the limit is a property of the spec, not of luck.
    """

    def __init__(self, tokenizer: Any, *, timeout_s: float = DEFAULT_LIMITS.grammar_compile_timeout_s,
                 cache_size: int = DEFAULT_CACHE_SIZE, workers: int = 1):
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.vocab_size)
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Future[Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grammar-compile")
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self.executor = llguidance.LLExecutor(num_threads=2)
        self.compiled = 0  # compiles run (cache misses), for tests and metrics

    @staticmethod
    def key(spec: bytes) -> str:
        return hashlib.sha256(spec).hexdigest()

    def compile(self, spec: bytes) -> Future[Any]:
        """The future compiled matcher of `spec` (JSON bytes); cached by content."""
        key = self.key(spec)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            self.compiled += 1
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return future

    def _compile(self, spec: bytes) -> Any:
        start = time.perf_counter()
        try:
            parsed = json.loads(spec)
        except (ValueError, UnicodeDecodeError) as err:
            raise GrammarError(f"the grammar spec is not valid JSON: {err}") from None
        grammar = spec_to_grammar(parsed, token_literal(self.tokenizer))
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise GrammarError(_short(matcher.get_error()))
        mask = np.zeros((1, (self.vocab_size + 31) // 32), dtype=np.int32)
        self.executor.unsafe_compute_mask_ptr([(matcher, 0)], mask.ctypes.data, mask.shape[1] * 4, 1)  # warm-up
        if matcher.is_error():
            raise GrammarError(_short(matcher.get_error()))
        elapsed = time.perf_counter() - start
        if elapsed > self.timeout_s:
            raise GrammarError(f"the grammar took {elapsed:.1f} s to compile; the limit is {self.timeout_s:g} s: "
                               "simplify the schema")
        return matcher

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SequenceGrammar:
    """One sequence's matcher: which tokens may come next, and its state after each sampled token."""

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it (the mask should have)."""
        return bool(self.matcher.consume_token(token))

    @property
    def complete(self) -> bool:
        """Nothing more may be generated: the reply ends here."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return str(self.matcher.get_error()) if self.matcher.is_error() else None


def fill_masks(executor: Any, rows: Sequence[tuple[SequenceGrammar, int]], masks: np.ndarray) -> None:
    """Compute the bitmask of every (grammar, row) into `masks` [rows, words] in parallel (the GIL released)."""
    executor.unsafe_compute_mask_ptr([(g.matcher, row) for g, row in rows], masks.ctypes.data,
                                     masks.shape[1] * 4, masks.shape[0])


def new_sequence_grammar(compiled: Any) -> SequenceGrammar:
    return SequenceGrammar(compiled.deep_copy())

