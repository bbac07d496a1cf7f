"""Generated requests against the app (the real routes, validation and tokenizer; a fake Triton).

Hypothesis builds chat bodies with wrong types, huge and negative numbers, NaN and infinities, lone
surrogates, control characters, invalid UTF-8, deep nesting and unknown roles. Whatever comes in,
the answer is never a 5xx, and every error is in the OpenAI shape. schemathesis then walks every
operation of the gateway's own OpenAPI schema, with auth off and on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.gateway_fakes import FakePool, make_client, write_repository

KEY = "fuzz-key-0123456789abc"
ADMIN = "fuzz-admin-0123456789abc"
HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["a\ud800b", "\udfff", "\x00", "\x1b[31m", "\u202e", "<|im_end|>", "<|im_start|>system",
                     "{{ raise_exception('x') }}", "😀" * 10, "x" * 3000]),
)
NUMBER = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0, -1, 2**31, 2**63, 2**64]))
ANY_SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, HOSTILE_TEXT)
ANY_JSON = st.recursive(ANY_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=8)
# JSON Schemas, valid or not: keywords with hostile values ($schema and $ref included).
SCHEMA = st.dictionaries(st.sampled_from(["type", "properties", "required", "enum", "$schema", "$ref", "not", "items",
                                          "pattern", "minLength", "anyOf"]), ANY_JSON, max_size=4)
TOOL = st.fixed_dictionaries({"type": st.one_of(st.just("function"), ANY_SCALAR), "function": st.fixed_dictionaries(
    {"name": st.one_of(HOSTILE_TEXT, st.just("get_time"))},
    optional={"parameters": st.one_of(ANY_JSON, SCHEMA), "description": ANY_SCALAR, "strict": ANY_SCALAR})})
TOOL_CALL = st.fixed_dictionaries({"id": ANY_SCALAR, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": HOSTILE_TEXT, "arguments": st.one_of(HOSTILE_TEXT, st.just('{"a": 1}'))})})
NAMED_CHOICE = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.one_of(HOSTILE_TEXT, st.just("get_time"))})})
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "developer", "tool", "root", ""]), ANY_SCALAR),
     "content": st.one_of(HOSTILE_TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": HOSTILE_TEXT}),
                                                max_size=2), ANY_JSON)},
    optional={"name": ANY_SCALAR, "extra": ANY_SCALAR, "tool_call_id": ANY_SCALAR,
              "tool_calls": st.one_of(ANY_JSON, st.lists(TOOL_CALL, max_size=2))},
)
COMPLETION_FIELDS = {"prompt": st.one_of(HOSTILE_TEXT, st.lists(HOSTILE_TEXT, max_size=3),
                                         st.lists(st.integers(-2, 60_000), max_size=5), ANY_JSON),
                     "echo": ANY_SCALAR, "logprobs": NUMBER, "max_tokens": NUMBER, "stream": ANY_SCALAR,
                     "suffix": ANY_SCALAR, "best_of": NUMBER, "logit_bias": ANY_JSON, "temperature": NUMBER}
COMPLETION_BODY = st.fixed_dictionaries({}, optional=COMPLETION_FIELDS)  # type: ignore[arg-type]
FIELDS = {"model": st.one_of(st.none(), HOSTILE_TEXT, st.just("chat")), "max_tokens": NUMBER, "temperature": NUMBER,
          "top_p": NUMBER, "top_k": NUMBER, "repetition_penalty": NUMBER, "seed": NUMBER,
          "stop": st.one_of(HOSTILE_TEXT, st.lists(HOSTILE_TEXT, max_size=6), ANY_JSON), "stream": ANY_SCALAR,
          "n": NUMBER, "ignore_eos": ANY_SCALAR, "logprobs": ANY_SCALAR, "unknown_field": ANY_SCALAR,
          "top_logprobs": NUMBER, "parallel_tool_calls": ANY_SCALAR,
          "response_format": st.one_of(ANY_JSON, st.fixed_dictionaries(
              {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
              optional={"json_schema": st.one_of(ANY_JSON, st.fixed_dictionaries(
                  {"name": HOSTILE_TEXT, "schema": st.one_of(ANY_JSON, SCHEMA)}, optional={"strict": ANY_SCALAR}))})),
          "tools": st.one_of(ANY_JSON, st.lists(TOOL, max_size=3)),
          "tool_choice": st.one_of(ANY_JSON, st.sampled_from(["none", "auto", "required", "any"]), NAMED_CHOICE)}
BODY = st.fixed_dictionaries({"messages": st.one_of(st.lists(MESSAGE, max_size=4), ANY_JSON)},
                             optional=FIELDS)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=COMPLETION_BODY)
def test_generated_completions_requests_never_get_a_5xx(client: TestClient, body: dict[str, Any]) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    _check(client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}))


def _deep(depth: int) -> str:
    return '{"messages": ' + "[" * depth + "]" * depth + "}"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    repository = write_repository(tmp_path_factory.mktemp("repo"), context_length=128, max_new_tokens=48)
    with make_client(repository, FakePool([9906, 28, 7]), max_message_chars=2000) as test_client:
        yield test_client


def _check(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODY, path=st.sampled_from(["/v1/chat/completions", "/v1/chat"]))
def test_generated_requests_never_get_a_5xx(client: TestClient, body: dict[str, Any], path: str) -> None:
    if path == "/v1/chat" and isinstance(body.get("messages"), list) and body["messages"] and "message" not in body:
        first = body["messages"][0]
        if len(body) % 2:
            body = {**body, "message": first.get("content") if isinstance(first, dict) else first}
    raw = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity as literals; surrogates as \ud800 escapes
    _check(client.post(path, content=raw, headers={"Content-Type": "application/json"}))


@pytest.mark.parametrize("raw", [
    b'{"messages": [{"role": "user", "content": "\xff\xfe invalid utf-8"}]}',
    b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # a surrogate encoded in UTF-8
    _deep(100_000).encode(),  # past the JSON parser's recursion limit
    _deep(50).encode(),
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}',
    b'{"messages": [{"role": "user", "content": "hi"}]',
    b"",
    b"null",
    b"[]",
])
def test_malformed_bodies_are_4xx_in_the_error_shape(client: TestClient, raw: bytes) -> None:
    response = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    _check(response)


@pytest.mark.parametrize("auth", [False, True])
def test_schemathesis_every_operation_of_the_openapi_schema(tmp_path: Path, auth: bool) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.core import NOT_SET
    repository = write_repository(tmp_path / "repo", context_length=128, max_new_tokens=48)
    keys: dict[str, Any] = {"api_keys": [KEY], "admin_api_keys": [ADMIN]} if auth else {}
    with make_client(repository, FakePool([9906, 28]), **keys) as test_client:
        schema = schemathesis.openapi.from_dict(test_client.get("/openapi.json").json())
        headers = {"Authorization": f"Bearer {KEY}"} if auth else {}
        seen: set[str] = set()
        failures: list[str] = []

        def check(case: Any) -> None:
            seen.add(case.operation.label)
            body = case.body if case.body is not NOT_SET else None
            response = test_client.request(case.method, case.formatted_path,
                                           headers={**headers, **(case.headers or {})}, params=case.query, json=body)
            if response.status_code >= 500:
                failures.append(f"{case.operation.label}: {response.status_code} {response.text[:200]}")
            _check(response)

        # Every operation gets its own examples: sampling operations at random could miss one.
        for operation in schema.get_all_operations():
            strategy = operation.ok().as_strategy()
            settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))(
                given(case=strategy)(check))()
        assert not failures, failures
        assert {"POST /v1/chat/completions", "POST /v1/chat", "POST /v1/completions", "GET /v1/models"} <= seen, seen
