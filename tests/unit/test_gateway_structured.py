"""response_format, tools, logprobs and /v1/completions through the app, over a fake Triton pool.

The real SmolLM2 tokenizer renders and decodes; the fake pool streams scripted ids (and scripted
log-probabilities), so these tests check what the gateway sends to Triton and how it shapes replies.
Generation under a real grammar is tested in tests/integration/test_structured_outputs.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.error_responses import BadRequestError
from gateway.openai_logprobs import TokenTexts
from gateway.tokenization import ChatTokenizer
from tests.unit.gateway_fakes import FakePool, assert_openai_error, make_client, sse_events, write_repository

MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL_TEXT = 'Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("repo"), context_length=512, max_new_tokens=64)


@pytest.fixture(scope="module")
def tokenizer(repository: Path) -> ChatTokenizer:
    tok_dir = repository / "chat" / "1" / "tokenizer"
    return ChatTokenizer.from_dir(tok_dir, (tok_dir / "chat_template.jinja").read_text())


def _client(repository: Path, pool: FakePool) -> Iterator[TestClient]:
    with make_client(repository, pool) as client:
        yield client


# One app per reply script for the module (tests read the pool's latest call, and reset what they set).
@pytest.fixture(scope="module")
def calls(repository: Path, tokenizer: ChatTokenizer) -> Iterator[tuple[TestClient, FakePool]]:
    pool = FakePool(tokenizer.encode(CALL_TEXT))
    for client in _client(repository, pool):
        yield client, pool


@pytest.fixture(scope="module")
def words(repository: Path, tokenizer: ChatTokenizer) -> Iterator[tuple[TestClient, FakePool]]:
    pool = FakePool(tokenizer.encode(" Paris is lovely."))
    for client in _client(repository, pool):
        yield client, pool


def test_response_format_becomes_the_grammar_triton_gets(words: tuple[TestClient, FakePool]) -> None:
    client, pool = words
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}
    assert client.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": rf}).status_code == 200
    assert json.loads(pool.calls[-1].grammar or "") == {"type": "json_schema", "schema": SCHEMA}
    tensors = {t.name(): t for t in pool.calls[-1].to_infer_inputs()}
    assert tensors["grammar"].datatype() == "BYTES"
    client.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": {"type": "json_object"}})
    assert json.loads(pool.calls[-1].grammar or "") == {"type": "json_object"}
    client.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": {"type": "text"}})
    assert pool.calls[-1].grammar is None and "grammar" not in {t.name() for t in pool.calls[-1].to_infer_inputs()}


def test_simple_chat_takes_a_response_format_too(words: tuple[TestClient, FakePool]) -> None:
    client, pool = words
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    assert client.post("/v1/chat", json={"message": "hi", "response_format": rf}).status_code == 200
    assert json.loads(pool.calls[-1].grammar or "") == {"type": "json_schema", "schema": SCHEMA}
    tool = [*MESSAGES, {"role": "tool", "content": "x", "tool_call_id": "c"}]
    assert_openai_error(client.post("/v1/chat", json={"messages": tool}), 422, "need /v1/chat/completions")


def test_tools_reach_a_template_without_them_as_a_system_prompt(calls: tuple[TestClient, FakePool],
                                                               tokenizer: ChatTokenizer) -> None:
    client, pool = calls
    body = {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required"}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    prompt = tokenizer.decode(pool.calls[-1].prompt_ids)
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt and prompt.index("<tools>") < prompt.index(
        "Weather in Paris?")
    spec = json.loads(pool.calls[-1].grammar or "")
    assert (spec["type"], spec["required"], spec["parallel"], spec["begin"]) == ("tool_calls", True, True,
                                                                                  "<tool_call>\n")
    assert spec["tools"] == [{"name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]
    named = {**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    client.post("/v1/chat/completions", json=named)
    assert json.loads(pool.calls[-1].grammar or "")["parallel"] is False
    client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})
    assert pool.calls[-1].grammar is None and "<tools>" not in tokenizer.decode(pool.calls[-1].prompt_ids)


def test_a_reply_with_a_call_has_tool_calls_and_finish_reason_tool_calls(calls: tuple[TestClient, FakePool]) -> None:
    client, _ = calls
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": [WEATHER]}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    plain = client.post("/v1/chat/completions", json={"messages": MESSAGES}).json()  # no tools: text as it is
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": CALL_TEXT}


def test_streamed_tool_calls_follow_openais_delta_order(calls: tuple[TestClient, FakePool]) -> None:
    client, _ = calls
    with client.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "tools": [WEATHER],
                                                            "stream": True}) as response:
        chunks = [json.loads(e) for e in sse_events(response)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content", "") for d in deltas)
    tool = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert content == "Checking. "
    assert set(tool[0]) == {"index", "id", "type", "function"} and tool[0]["function"] == {
        "name": "get_weather", "arguments": ""}
    assert all(set(t) == {"index", "function"} and set(t["function"]) == {"arguments"} for t in tool[1:])
    assert "".join(t["function"]["arguments"] for t in tool) == '{"city": "Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_logprobs_have_openais_shape(words: tuple[TestClient, FakePool], tokenizer: ChatTokenizer) -> None:
    client, pool = words
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}).json()
    assert pool.calls[-1].logprobs == 2
    content = body["choices"][0]["logprobs"]["content"]
    ids = tokenizer.encode(" Paris is lovely.")
    assert [t["logprob"] for t in content] == [-0.5 * (i + 1) for i in range(len(ids))]
    assert "".join(t["token"] for t in content) == " Paris is lovely."
    assert all(bytes(t["bytes"]).decode() == t["token"] and len(t["top_logprobs"]) == 2 for t in content)
    assert content[0]["top_logprobs"][1]["token"] == tokenizer.decode([ids[0] + 1])
    with client.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "logprobs": True,
                                                            "stream": True}) as response:
        chunks = [json.loads(e) for e in sse_events(response)[:-1]]
    streamed = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for t in c["choices"][0]["logprobs"]["content"]]
    assert [t["logprob"] for t in streamed] == [t["logprob"] for t in content]
    assert client.post("/v1/chat/completions", json={"messages": MESSAGES}).json()["choices"][0]["logprobs"] is None


def test_token_bytes_are_exact_even_for_part_of_a_character(tokenizer: ChatTokenizer) -> None:
    texts = TokenTexts(tokenizer.tokenizer)
    for text in ("😀", "巴黎", " Paris", "<|im_end|>"):
        ids = tokenizer.encode(text)
        assert b"".join(bytes(texts.of(i)[1]) for i in ids) == text.encode(), text
    emoji = tokenizer.encode("😀")
    assert len(emoji) > 1 and texts.of(emoji[0])[0] == "\ufffd"  # a token with part of the character


def test_a_grammar_the_model_refuses_is_a_400_naming_the_field(words: tuple[TestClient, FakePool]) -> None:
    client, pool = words
    try:
        pool.error = BadRequestError('the generation model rejected the request: invalid request: grammar: '
                                     'Unimplemented keys: ["not"]')
        rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"not": {}}}}
        response = client.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": rf})
        assert_openai_error(response, 400, 'response_format: Unimplemented keys: ["not"]', param="response_format")
        pool.error = BadRequestError("the generation model rejected the request: invalid request: grammar: bad")
        response = client.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": [WEATHER],
                                                              "stream": True})
        assert_openai_error(response, 400, "tools: bad", param="tools")
    finally:
        pool.error = None


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "less than or equal to 20"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope', which is not"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER, WEATHER]}, "distinct function names"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "should match pattern"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot constrain"),
    ({"response_format": {"type": "json_schema"}}, "json_schema is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "not a valid JSON Schema"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [*MESSAGES, {"role": "tool", "content": "x", "tool_call_id": "c9"}]},
     "answers tool_call_id 'c9', which no earlier assistant message called"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "only tool messages"),
    ({"messages": [{"role": "user", "tool_calls": []}]}, "only assistant messages"),
    ({"messages": [{"role": "assistant"}]}, "content is required"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "[1]"}}]}]}, "must be a JSON object"),
])
def test_bad_structured_fields_are_422s(words: tuple[TestClient, FakePool], extra: dict[str, Any],
                                        fragment: str) -> None:
    client, pool = words
    before = len(pool.calls)
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, **extra})
    assert_openai_error(response, 422, fragment)
    assert len(pool.calls) == before  # refused before Triton


def test_completions_text_and_token_prompts(words: tuple[TestClient, FakePool], tokenizer: ChatTokenizer) -> None:
    client, pool = words
    body = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 3}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == tokenizer.decode(tokenizer.encode(" Paris is lovely.")[:3])
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["logprobs"] is None
    assert pool.calls[-1].prompt_ids == tokenizer.encode("The capital of France is")  # no chat template
    two = client.post("/v1/completions", json={"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["usage"]["prompt_tokens"] == 5
    assert [c.prompt_ids for c in pool.calls[-2:]] == [[1, 2, 3], [4, 5]]


def test_completions_echo_with_logprobs(words: tuple[TestClient, FakePool], tokenizer: ChatTokenizer) -> None:
    client, pool = words
    prompt = "The capital of France is"
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "echo": True,
                                                 "logprobs": 1}).json()
    assert (pool.calls[-1].logprobs, pool.calls[-1].prompt_logprobs) == (1, 1)
    choice = body["choices"][0]
    prompt_ids = tokenizer.encode(prompt)
    assert choice["text"].startswith(prompt)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt_ids) + 2 and "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(prompt_ids)] == [-0.5 * (i + 1) for i in range(1, len(prompt_ids))]
    assert lp["token_logprobs"][len(prompt_ids):] == [-0.5, -1.0]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
    with client.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "echo": True,
                                                         "logprobs": 0, "stream": True}) as response:
        chunks = [json.loads(e) for e in sse_events(response)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [v for c in chunks if c["choices"][0]["logprobs"]
            for v in c["choices"][0]["logprobs"]["token_logprobs"]] == lp["token_logprobs"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"prompt": "x", "n": 2}, 400, "only n=1"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ({"prompt": ["a", "b"], "stream": True}, 400, "one prompt"),
    ({"prompt": [1, 99999999]}, 400, "outside the vocabulary"),
    ({"prompt": []}, 422, "must not be empty"),
    ({"prompt": [[1], []]}, 422, "must not be empty"),
    ({"prompt": [-1]}, 422, ">= 0"),
    ({"prompt": "x", "logprobs": 21}, 422, "less than or equal to 20"),
    ({"prompt": "x", "max_tokens": 0}, 422, "greater than or equal to 1"),
])
def test_bad_completions_requests(words: tuple[TestClient, FakePool], body: dict[str, Any], status: int,
                                  fragment: str) -> None:
    client, _ = words
    assert_openai_error(client.post("/v1/completions", json=body), status, fragment)
