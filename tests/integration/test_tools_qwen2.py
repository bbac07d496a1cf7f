"""Tool calling on a model of another family: a random-weight Qwen2 with Qwen2's real tokenizer and a ChatML
template that renders tools (Qwen2.5's), behind a real Triton (18150-18152) and gateway (18153).

Its weights are random, so its text is noise; what must hold is what the grammar and the template
decide: the prompt is the model's own template with the tools (not the gateway's fallback system
prompt), required and named calls are valid calls of known tools, and the stream carries the same.
One call per reply (``parallel_tool_calls: false``): a random model never chooses to stop adding calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import transformers

from tests.devrepo import ServedRepository, write_serving_repository
from tests.integration.conftest import Gateway, gateway_over_triton
from tests.integration.openai_tools import (
    ASK_WEATHER,
    TOOLS,
    auto_calls,
    required_or_named_calls,
    two_turn_conversation,
)
from tests.integration.qwen2_fixture import IM_END, REPO_ROOT, export_random_qwen2
from tests.reference import ReferenceTokenizer

pytestmark = pytest.mark.integration

MODEL = "qwen2-random"
TRITON_PORTS, GATEWAY_PORT = (18150, 18151, 18152), 18153


@pytest.fixture(scope="module")
def qwen2_onnx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export, cached across sessions (keyed on the code that makes it and transformers' version)."""
    makers = ("tests/integration/qwen2_fixture.py", "tests/family_models.py", "toolkit/export/torch_to_onnx.py")
    key = hashlib.sha256(transformers.__version__.encode() + b"".join(
        (REPO_ROOT / name).read_bytes() for name in makers)).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir(f"qwen2-random-{key}")) if cache else tmp_path_factory.mktemp("qwen2-random")
    onnx = root / "onnx" / "model.onnx"
    return onnx if onnx.is_file() else export_random_qwen2(root)


@pytest.fixture(scope="module")
def repository(qwen2_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> ServedRepository:
    return write_serving_repository(tmp_path_factory.mktemp("qwen2-repo"), MODEL, qwen2_onnx, context_length=2048,
                                    max_new_tokens_limit=256, tokenizer_dir=qwen2_onnx.parent,
                                    stop_token_ids=[IM_END], pad_token_id=IM_END)


@pytest.fixture(scope="module")
def stack(repository: ServedRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    logs = tmp_path_factory.mktemp("qwen2-stack")
    with gateway_over_triton(repository.path, [MODEL], TRITON_PORTS, GATEWAY_PORT, logs) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_the_prompt_is_the_models_own_template_with_tools(client: openai.OpenAI, repository: ServedRepository) -> None:
    reference = ReferenceTokenizer(repository.path / MODEL / "1" / "tokenizer")
    with_tools = reference.render_ids(ASK_WEATHER, tools=TOOLS)
    without = reference.render_ids(ASK_WEATHER)
    assert len(with_tools) > len(without) + 50  # the template writes the tools' signatures into the prompt
    reply = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, max_tokens=1,
                                           temperature=0)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(with_tools)
    plain = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=1, temperature=0)
    assert plain.usage is not None and plain.usage.prompt_tokens == len(without)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_required_and_named_calls_are_valid(client: openai.OpenAI, choice: Any) -> None:
    required_or_named_calls(client, MODEL, choice, parallel_tool_calls=False)


def test_auto_is_text_or_valid_calls(client: openai.OpenAI) -> None:
    auto_calls(client, MODEL)


def test_a_tool_result_goes_back_through_the_template(client: openai.OpenAI) -> None:
    two_turn_conversation(client, MODEL, parallel_tool_calls=False)
