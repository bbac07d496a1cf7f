"""Grammar specs compiled by the real llguidance over SmolLM2's real tokenizer: what each spec allows and refuses."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import numpy as np
import pytest
from transformers import AutoTokenizer

from toolkit.runtime.grammar import (
    GrammarCompiler,
    GrammarError,
    SequenceGrammar,
    apply_bitmask,
    fill_masks,
    load_tokenizer,
)

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "smollm2_tokenizer"
VOCAB, EOS = 49152, 2
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}
CLOCK = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}
HERMES = {"type": "tool_calls", "begin": "<tool_call>\n", "end": "\n</tool_call>", "arguments_key": "arguments"}


@pytest.fixture(scope="module")
def hf() -> Any:
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(load_tokenizer((TOKENIZER / "tokenizer.json").read_text(), VOCAB, [EOS]))


def _allowed(compiler: GrammarCompiler, grammar: SequenceGrammar) -> np.ndarray:
    masks = np.zeros((1, (VOCAB + 31) // 32), dtype=np.int32)
    fill_masks(compiler.executor, [(grammar, 0)], masks)
    logits = np.zeros(VOCAB, dtype=np.float32)
    apply_bitmask(logits, masks[0])
    return np.isfinite(logits)


def _walk(compiler: GrammarCompiler, hf: Any, spec: dict[str, Any], text: str) -> tuple[SequenceGrammar, str | None]:
    """Feed `text`'s tokens through a fresh matcher; the first token the mask forbids, if any."""
    grammar = SequenceGrammar(compiler.compile(json.dumps(spec).encode()).result().deep_copy())
    for token in hf(text, add_special_tokens=False)["input_ids"]:
        if not _allowed(compiler, grammar)[token]:
            return grammar, hf.decode([token])
        assert grammar.accept(token)
    return grammar, None


def test_a_json_schema_allows_valid_instances_only_and_ends_with_them(compiler: GrammarCompiler, hf: Any) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "rank": {"type": "integer"},
                                               "kind": {"enum": ["big", "small"]}},
              "required": ["city", "rank", "kind"], "additionalProperties": False}
    spec = {"type": "json_schema", "schema": schema}
    grammar, refused = _walk(compiler, hf, spec, '{"city": "Paris", "rank": 1, "kind": "big"}')
    assert refused is None and grammar.complete
    assert np.flatnonzero(_allowed(compiler, grammar)).tolist() == [EOS]  # complete: only the end of the reply
    _, refused = _walk(compiler, hf, spec, '{"city": "Paris", "rank": "one"')
    assert refused is not None and refused.startswith(' "')  # a string where the schema wants an integer
    _, refused = _walk(compiler, hf, spec, '{"city": "Paris", "rank": 1, "kind": "huge"}')
    assert refused is not None
    _, refused = _walk(compiler, hf, spec, '{"city":"Paris"}')  # compact separators are json.dumps' own
    assert refused is not None


def test_json_object_allows_any_object_but_nothing_else(compiler: GrammarCompiler, hf: Any) -> None:
    grammar, refused = _walk(compiler, hf, {"type": "json_object"}, '{"a": [1, {"b": null}]}')
    assert refused is None and grammar.complete
    _, refused = _walk(compiler, hf, {"type": "json_object"}, "[1]")
    assert refused == "["


def test_required_tool_calls_are_calls_of_known_tools_with_valid_arguments(compiler: GrammarCompiler, hf: Any) -> None:
    spec = {**HERMES, "tools": [WEATHER, CLOCK], "required": True, "parallel": True}
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    grammar, refused = _walk(compiler, hf, spec, call + "\n" + call.replace("get_weather", "get_time").replace(
        '"city": "Oslo", "unit": "celsius"', '"zone": "CET"'))
    assert refused is None
    assert _allowed(compiler, grammar)[EOS]
    assert _walk(compiler, hf, spec, "Sure, <tool_call>")[1] is not None  # no text before a required call
    assert _walk(compiler, hf, spec, '<tool_call>\n{"name": "get_wind"')[1] is not None
    assert _walk(compiler, hf, spec, call.replace("celsius", "kelvin"))[1] is not None
    single = {**spec, "parallel": False}
    grammar, _ = _walk(compiler, hf, single, call)
    assert np.flatnonzero(_allowed(compiler, grammar)).tolist() == [EOS]


def test_auto_tool_calls_leave_text_free_and_constrain_each_call(compiler: GrammarCompiler, hf: Any) -> None:
    spec = {**HERMES, "tools": [WEATHER], "required": False, "parallel": True}
    grammar, refused = _walk(compiler, hf, spec, "No tool needed: it is {sunny} <today>.")
    assert refused is None and _allowed(compiler, grammar)[EOS]
    _, refused = _walk(compiler, hf, spec, 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": '
                                           '{"city": "Rome", "unit": "celsius"}}\n</tool_call>')
    assert refused is None
    assert _walk(compiler, hf, spec, 'Let me look. <tool_call>\n{"name": "launch"')[1] is not None


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "json_schema", "schema": {"type": "string", "not": {"const": "x"}}}, "not"),
    ({"type": "json_schema", "schema": {"type": "object", "if": {}, "then": {}}}, "if"),
    ({"type": "json_schema", "schema": {"type": "strin"}}, "strin"),
    ({"type": "json_schema", "schema": {"type": "string", "format": "color"}}, "color"),
    ({"type": "json_schema"}, "needs \"schema\""),
    ({"type": "regex", "pattern": "a+"}, "unknown grammar type 'regex'"),
    ({"type": "tool_calls", "tools": [], "required": True}, "at least one tool"),
    ({"type": "tool_calls", "tools": [WEATHER], "required": False, "begin": ""}, "needs a 'begin'"),
    ([], "JSON object"),
])
def test_a_bad_spec_is_refused_naming_the_problem(compiler: GrammarCompiler, spec: Any, message: str) -> None:
    with pytest.raises(GrammarError) as err:
        compiler.compile(json.dumps(spec).encode()).result()
    assert message in str(err.value)


def test_not_json_is_refused(compiler: GrammarCompiler) -> None:
    with pytest.raises(GrammarError, match="not valid JSON"):
        compiler.compile(b"{type: json}").result()


def test_compiles_are_cached_by_content_and_failures_too(hf: Any) -> None:
    compiler = GrammarCompiler(load_tokenizer((TOKENIZER / "tokenizer.json").read_text(), VOCAB, [EOS]))
    spec = json.dumps({"type": "json_schema", "schema": {"type": "integer"}}).encode()
    first = compiler.compile(spec).result()
    assert compiler.compile(bytes(spec)).result() is first and compiler.compiled == 1
    compiler.compile(json.dumps({"type": "json_object"}).encode()).result()
    assert compiler.compiled == 2
    bad = json.dumps({"type": "json_schema", "schema": {"not": {}}}).encode()
    for _ in range(2):
        with pytest.raises(GrammarError):
            compiler.compile(bad).result()
    assert compiler.compiled == 3


def test_a_compile_over_the_time_limit_is_refused_and_stays_refused() -> None:
    compiler = GrammarCompiler(load_tokenizer((TOKENIZER / "tokenizer.json").read_text(), VOCAB, [EOS]),
                               timeout_s=0.05)
    big = {"type": "json_schema", "schema": {"enum": [f"w{i:06d}" for i in range(60_000)]}}  # ~0.4 s
    spec = json.dumps(big).encode()
    with pytest.raises(GrammarError, match=r"took .* s to compile; the limit is 0.05 s"):
        compiler.compile(spec).result()
    with pytest.raises(GrammarError, match="the limit is 0.05 s"):
        compiler.compile(spec).result()


def test_compiling_runs_in_a_worker_thread(compiler: GrammarCompiler) -> None:
    future = compiler.compile(json.dumps({"type": "json_schema", "schema": {"type": "boolean"}}).encode())
    future.result()
    names: list[str] = []
    compiler._pool.submit(lambda: names.append(threading.current_thread().name)).result()
    assert names[0].startswith("grammar-compile") and names[0] != threading.current_thread().name


def test_apply_bitmask_forbids_exactly_the_cleared_bits() -> None:
    rng = np.random.default_rng(0)
    vocab = 100
    mask = rng.integers(-(2**31), 2**31 - 1, (vocab + 31) // 32, dtype=np.int64).astype(np.int32)
    logits = rng.standard_normal(vocab).astype(np.float32)
    expected = logits.copy()
    for token in range(vocab):
        if not (int(mask[token // 32]) >> (token % 32)) & 1:
            expected[token] = -np.inf
    apply_bitmask(logits, mask)
    np.testing.assert_array_equal(logits, expected)


def test_a_walked_instance_validates_against_its_schema(compiler: GrammarCompiler, hf: Any) -> None:
    """Greedy decoding of random logits through the mask always yields valid JSON for the schema."""
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["tags", "n"], "additionalProperties": False}
    template = compiler.compile(json.dumps({"type": "json_schema", "schema": schema}).encode()).result()
    rng = np.random.default_rng(1)
    for _ in range(5):
        grammar, out = SequenceGrammar(template.deep_copy()), []
        for _ in range(60):
            logits = rng.standard_normal(VOCAB).astype(np.float32)
            logits[~_allowed(compiler, grammar)] = -np.inf
            token = int(np.argmax(logits))
            if token == EOS:
                break
            assert grammar.accept(token)
            out.append(token)
            if grammar.complete:
                break
        jsonschema.validate(json.loads(hf.decode(out)), schema)


def test_a_tool_call_whose_markers_are_special_tokens_is_matched_by_token_for_every_tool_choice() -> None:
    """Qwen2.5's <tool_call> and </tool_call> are added tokens (ids 151657 and 151658 in its real tokenizer,
    tests/family_models.py): llguidance never matches their text byte for byte, so the grammar must name them."""
    from tests import family_models as families
    from toolkit.runtime.grammar import spec_to_grammar, token_literal

    text, _added, _size = families._tokenizer_json(families.FAMILIES["qwen2.5"])
    qwen = load_tokenizer(text, 151936, [151645])
    literal = token_literal(qwen)
    assert literal("<tool_call>\n") == '<[151657]> "\\n"' and literal("\n</tool_call>") == '"\\n" <[151658]>'
    assert literal("plain words") == '"plain words"'
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}
    call = [151657, *qwen.tokenize_str('\n{"name": "f", "arguments": {"x": 3}}\n'), 151658]
    for required, prefix in ((True, []), (False, qwen.tokenize_str("Let me look. "))):
        spec = {"type": "tool_calls", "tools": [tool], "begin": "<tool_call>\n", "end": "\n</tool_call>",
                "required": required}
        matcher = llguidance.LLMatcher(qwen, spec_to_grammar(spec, literal), log_level=0)
        assert all(matcher.consume_token(t) for t in prefix + call), matcher.get_error()
        assert matcher.is_accepting()
        plain = llguidance.LLMatcher(qwen, spec_to_grammar(spec), log_level=0)  # text literals: the token is refused
        assert not all(plain.consume_token(t) for t in prefix + call)
