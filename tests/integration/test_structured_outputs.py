"""Structured outputs, tool calling and logprobs on the served SmolLM2-135M, through real clients.

One Triton (18140-18142) and one gateway (18143) for the module, serving the real SmolLM2 with a
grammar compile limit of 0.25 s. A 135M model answers badly, but under grammar-constrained decoding
what it writes must always parse and validate: that is what these tests check, with the official
``openai`` client (``parse``, tools, streaming), LangChain's ``ChatOpenAI``, and raw HTTP for errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.devrepo import ServedRepository
from tests.integration.conftest import Gateway, gateway_over_triton, write_generation_repository
from tests.integration.openai_tools import (
    ASK_WEATHER,
    PARAMETERS,
    TOOLS,
    WEATHER,
    auto_calls,
    required_or_named_calls,
    two_turn_conversation,
)

pytestmark = pytest.mark.integration

TRITON_PORTS, GATEWAY_PORT = (18140, 18141, 18142), 18143
MODEL = "smollm2-structured"
TIMEOUT_S = 180.0
COMPILE_LIMIT_S = 0.25


class City(BaseModel):
    """Bounded in every field (string lengths, integer range, list size), so every reply ends in time."""

    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_thousands: int = Field(ge=0, le=50_000)
    continent: Literal["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]
    landmarks: list[Annotated[str, Field(max_length=24)]] = Field(max_length=2)


CITIES = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Mumbai", "Madrid",
          "Berlin", "Seoul", "Lagos", "Quito", "Rome", "Hanoi", "Dakar", "Bogota", "Vienna", "Perth",
          "Delhi", "Lisbon", "Accra", "Havana", "Prague"]
PROMPTS = [f"Describe the city of {c} as JSON." for c in CITIES] + \
    [f"Give me facts about {c}, formatted as the requested object." for c in CITIES]
# 8000 patterned properties, ~0.5 MB: about 5 s to compile on a 2-core CI machine, 20x the limit.
SLOW_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "^[a-z]{1,8}[0-9]{1,3}$"}
                                                for i in range(8000)}}
@pytest.fixture(scope="module")
def repository(smollm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> ServedRepository:
    return write_generation_repository(tmp_path_factory.mktemp("structured-repo"), MODEL, smollm_onnx,
                                       context_length=2048, max_new_tokens_limit=512,
                                       grammar_compile_timeout_s=COMPILE_LIMIT_S)


@pytest.fixture(scope="module")
def stack(repository: ServedRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    logs = tmp_path_factory.mktemp("structured-stack")
    with gateway_over_triton(repository.path, [MODEL], TRITON_PORTS, GATEWAY_PORT, logs) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def _parse(client: openai.OpenAI, prompt: str) -> City:
    reply = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          response_format=City, max_tokens=200, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content or ""), City.model_json_schema())
    assert isinstance(choice.message.parsed, City)
    return choice.message.parsed


def _stream_parse(client: openai.OpenAI, prompt: str) -> City:
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                        response_format=City, max_tokens=200, temperature=0) as stream:
        final = stream.get_final_completion()
    text = final.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), City.model_json_schema())
    parsed = final.choices[0].message.parsed
    assert isinstance(parsed, City)
    return parsed


def test_parse_returns_a_valid_object_for_50_prompts_streamed_or_not(client: openai.OpenAI) -> None:
    with ThreadPoolExecutor(16) as pool:
        whole = list(pool.map(lambda p: _parse(client, p), PROMPTS))
        streamed = list(pool.map(lambda p: _stream_parse(client, p), PROMPTS))
    assert len(whole) == len(streamed) == 50
    assert streamed == whole  # greedy: the stream carries the same object
    assert len({c.name for c in whole}) > 5  # the prompts differ, and so do the answers


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_required_and_named_tool_choice_give_valid_calls_streamed_or_not(client: openai.OpenAI, choice: Any) -> None:
    required_or_named_calls(client, MODEL, choice)


def test_auto_tool_choice_is_text_or_valid_calls_and_streams_the_same(client: openai.OpenAI) -> None:
    auto_calls(client, MODEL)


def test_a_two_turn_conversation_with_a_tool_result(client: openai.OpenAI) -> None:
    second = two_turn_conversation(client, MODEL)
    assert second.choices[0].message.content  # SmolLM2 answers in words


def test_langchain_binds_tools_and_gets_structured_output(stack: Gateway) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{stack.url}/v1", api_key="unused", temperature=0, max_tokens=200,
                     timeout=TIMEOUT_S, max_retries=0)
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    jsonschema.validate(message.tool_calls[0]["args"], PARAMETERS["get_weather"])
    city = llm.with_structured_output(City, method="json_schema").invoke("Describe Rome.")
    assert isinstance(city, City)


def test_chat_logprobs_streamed_or_not(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8,
                               "temperature": 0, "logprobs": True, "top_logprobs": 3}
    reply = client.chat.completions.create(model=MODEL, **request)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3 and token.bytes == list(token.token.encode())
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen token is the likeliest
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-6)
    streamed = [t for c in client.chat.completions.create(model=MODEL, stream=True, **request)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_completions_echo_returns_the_prompts_logprobs(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt) and choice.logprobs is not None
    tokens, values = choice.logprobs.tokens or [], choice.logprobs.token_logprobs or []
    assert "".join(tokens).startswith(prompt) and values[0] is None and all(v <= 0 for v in values[1:])
    assert len(tokens) == reply.usage.prompt_tokens + 3  # type: ignore[union-attr]
    assert all(len(top) <= 2 for top in (choice.logprobs.top_logprobs or [])[1:])


@pytest.mark.parametrize(("body", "status", "param", "fragment"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     422, "response_format.json_schema.schema", "not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}}, 400, "response_format", "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": SLOW_SCHEMA}}}, 400,
     "response_format", f"{COMPILE_LIMIT_S:g} s"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, 422, None,
     "'launch', which is not in tools"),
    ({"messages": [*ASK_WEATHER, {"role": "tool", "content": "18C"}]}, 422, None, "tool_call_id"),
    ({"messages": [*ASK_WEATHER, {"role": "tool", "tool_call_id": "call_x", "content": "18C"}]}, 422, None,
     "no earlier assistant message called"),
    ({"messages": [*ASK_WEATHER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_time", "arguments": "{not json"}}]}]}, 422, None, "not valid JSON"),
    ({"logprobs": True, "top_logprobs": 21}, 422, "top_logprobs", "less than or equal to 20"),
])
def test_bad_structured_requests_get_a_clear_error(stack: Gateway, body: dict[str, Any], status: int,
                                                   param: str | None, fragment: str) -> None:
    payload = {"model": MODEL, "messages": ASK_WEATHER, "max_tokens": 4, **body}
    response = httpx.post(f"{stack.url}/v1/chat/completions", json=payload, timeout=TIMEOUT_S)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"], error
    if param is not None:
        assert error["param"] == param, error


CAPITALS = [("France", "Paris", ["Paris", "Rome", "Madrid"]), ("Japan", "Tokyo", ["Seoul", "Tokyo", "Beijing"]),
            ("Italy", "Rome", ["Rome", "Paris", "Lisbon"]), ("Spain", "Madrid", ["Berlin", "Madrid", "Oslo"])]


def _task_files(root: Path) -> Path:
    """Two lm-eval tasks over one local JSONL file (nothing can be downloaded): log-likelihood and generation."""
    data = root / "capitals.jsonl"
    data.write_text("".join(json.dumps({"country": c, "capital": cap, "choices": ch, "answer": ch.index(cap)}) + "\n"
                            for c, cap, ch in CAPITALS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "ll.yaml").write_text(
        "task: toolkit_capitals_ll\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "Question: What is the capital of {{country}}?\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    (root / "gen.yaml").write_text(
        "task: toolkit_capitals_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "What is the capital of {{country}}? Answer with the city name only."\n'
        'doc_to_target: "{{capital}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n    ignore_case: true\n"
        "    ignore_punctuation: true\n")
    return root


def _lm_eval(stack: Gateway, tasks: Path, monkeypatch: pytest.MonkeyPatch, model: str, task: str,
             **model_args: Any) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tasks / "datasets-cache"))
    results = lm_eval.simple_evaluate(
        model=model, model_args={"model": MODEL, "num_concurrent": 1, "max_retries": 1, **model_args},
        tasks=[task], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
        apply_chat_template=model == "local-chat-completions",
    )
    assert results is not None
    return results


def test_lm_eval_log_likelihoods_equal_onnxruntimes(stack: Gateway, repository: ServedRepository, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's local-completions scores a multiple-choice task through /v1/completions (echo + logprobs)."""
    import numpy as np
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from toolkit.runtime.logprobs import log_softmax
    from toolkit.runtime.onnx_lm import OnnxCausalLM

    tokenizer_dir = repository.path / MODEL / "1" / "tokenizer"
    args = {"base_url": f"{stack.url}/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(tokenizer_dir)}
    results = _lm_eval(stack, _task_files(tmp_path), monkeypatch, "local-completions", "toolkit_capitals_ll", **args)
    assert 0.0 <= results["results"]["toolkit_capitals_ll"]["acc,none"] <= 1.0
    encoder = LocalCompletionsAPI(model=MODEL, **args)
    reference = OnnxCausalLM(repository.onnx)  # the graph as exported: every position's logits
    scored = 0
    for sample in results["samples"]["toolkit_capitals_ll"]:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            context_ids, continuation_ids = encoder._encode_pair(context, continuation)
            ids = context_ids + continuation_ids
            logits, _ = reference.forward(np.asarray([ids]), np.ones((1, len(ids)), np.int64),
                                          np.arange(len(ids))[None], reference.empty_past(1))
            logp = log_softmax(logits[0])
            want = sum(logp[len(context_ids) - 1 + i, t] for i, t in enumerate(continuation_ids))
            assert response[0][0] == pytest.approx(want, abs=1e-3), (context, continuation)
            scored += 1
    assert scored == sum(len(c[2]) for c in CAPITALS)


def test_lm_eval_generates_through_chat_completions(stack: Gateway, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    results = _lm_eval(stack, _task_files(tmp_path), monkeypatch, "local-chat-completions", "toolkit_capitals_gen",
                       base_url=f"{stack.url}/v1/chat/completions")
    score = results["results"]["toolkit_capitals_gen"]["exact_match,none"]
    answers = [s["resps"][0][0] for s in results["samples"]["toolkit_capitals_gen"]]
    assert len(answers) == len(CAPITALS) and all(isinstance(a, str) and a for a in answers)
    assert any("Paris" in a for a in answers)  # SmolLM2 knows this one
    assert 0.0 <= score <= 1.0
