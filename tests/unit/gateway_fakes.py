"""Helpers for the gateway unit tests: a repository with the real SmolLM2 tokenizer, and a fake Triton pool.

The fake pool stands in for Triton only in tests/unit; tests/integration/test_gateway.py drives a real one.
"""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.error_responses import TritonUnavailableError
from gateway.settings import GatewaySettings
from gateway.triton import GenerationInputs, StepOutput, TokenLogprobs
from toolkit.repository.manifest import ModelManifest

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "smollm2_tokenizer"
EOS_ID = 2  # <|im_end|>
KEY = "test-key-0123456789"
ADMIN = "admin-key-0123456789"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def write_repository(root: Path, name: str = "chat", context_length: int = 128, max_new_tokens: int = 48) -> Path:
    """A repository with one generation model `name` (version 1): config, manifest, tokenizer."""
    version_dir = root / name / "1"
    shutil.copytree(TOKENIZER_DIR, version_dir / "tokenizer")
    template = (TOKENIZER_DIR / "chat_template.jinja").read_text()
    ModelManifest(
        model_name=name,
        version=1,
        base_model="SmolLM2-135M-Instruct",
        adapter_sha256=None,
        toolkit_version="0.1.0",
        built_at="2026-11-23T00:00:00Z",
        context_length=context_length,
        vocab_size=49152,
        num_layers=30,
        num_kv_heads=3,
        head_dim=64,
        bos_token_id=1,
        eos_token_ids=[EOS_ID],
        stop_token_ids=[EOS_ID],
        pad_token_id=EOS_ID,
        chat_template=template,
        chat_template_sha256="0" * 64,
        serving_core_model=f"{name}_onnx_fp32",
    ).save(version_dir)
    (root / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 8\n'
        f'parameters {{ key: "max_new_tokens_limit" value {{ string_value: "{max_new_tokens}" }} }}\n'
    )
    return root


def fake_logprobs(ids: list[int], k: int, offset: int = 0, prompt: bool = False) -> TokenLogprobs:
    """Scripted log-probabilities: token i of a reply has -0.5 * (i + 1), its alternatives itself, then id + 1...

    A prompt's first token has none (NaN), as the generation model sends it.
    """
    import numpy as np

    token = np.asarray([-0.5 * (offset + i + 1) for i in range(len(ids))], dtype=np.float32)
    if prompt:
        token[0] = math.nan
    top_ids = np.asarray([[t + j for j in range(k)] for t in ids], dtype=np.int64).reshape(len(ids), k)
    top = np.asarray([[float(v) - j for j in range(k)] for v in token], dtype=np.float32).reshape(len(ids), k)
    return TokenLogprobs(token, top_ids, top)


class FakeClient:
    """The two calls the health route makes on an endpoint's client."""

    def __init__(self, ready: bool) -> None:
        self.ready = ready

    async def is_model_ready(self, name: str, client_timeout: float | None = None) -> bool:
        return self.ready

    async def close(self) -> None:
        return None


@dataclass
class FakeEndpoint:
    url: str
    client: FakeClient
    healthy: bool = True
    last_error: str | None = None
    ready_models: set[str] = field(default_factory=set)


class FakePool:
    """Streams scripted token ids as the generation model would, one id per response.

    As the serving contract says (``toolkit.repository.contract``): a stop token is never streamed;
    the reply ends with a final response carrying the finish reason ("stop" when the model would
    sample a stop token next, "length" at max_tokens) and the token counts.
    """

    def __init__(self, reply_ids: list[int], healthy: bool = True, finish: str = "stop") -> None:
        if EOS_ID in reply_ids:
            raise ValueError("the generation model never streams a stop token; script the reply without it")
        self.reply_ids = reply_ids
        self.finish = finish
        self.endpoints = [FakeEndpoint("fake:8001", FakeClient(healthy), healthy=healthy)]
        self.watched_models: set[str] = set()
        self.unresolved: dict[str, str] = {}
        self.calls: list[GenerationInputs] = []
        self.closed_early = 0
        self.step_delay_s = 0.0
        self.error: Exception | None = None  # raised instead of generating (a refusal of the generation model)

    async def start(self) -> None:
        for endpoint in self.endpoints:
            endpoint.ready_models = set(self.watched_models) if endpoint.healthy else set()

    async def close(self) -> None:
        return None

    def healthy(self) -> list[FakeEndpoint]:
        return [e for e in self.endpoints if e.healthy]

    async def generate(
        self, model: str, inputs: GenerationInputs, timeout_s: float, request_id: str = ""
    ) -> AsyncGenerator[StepOutput, None]:
        if not self.healthy():
            raise TritonUnavailableError("no Triton endpoint is ready (fake)", retry_after_s=1)
        self.calls.append(inputs)
        stops = {EOS_ID, *inputs.stop_token_ids}
        ids: list[int] = []
        finish = self.finish
        for token in self.reply_ids:
            if token in stops:
                finish = "stop"
                break
            ids.append(token)
            if len(ids) == inputs.max_tokens:
                finish = "length"
                break
        if self.error is not None:
            raise self.error
        finished = False
        try:
            for index, token in enumerate(ids):
                if self.step_delay_s:
                    await asyncio.sleep(self.step_delay_s)
                prompt = fake_logprobs(inputs.prompt_ids, inputs.prompt_logprobs, prompt=True) \
                    if index == 0 and inputs.prompt_logprobs is not None else None
                logprobs = fake_logprobs([token], inputs.logprobs, offset=index) if inputs.logprobs is not None \
                    else None
                yield StepOutput([token], logprobs=logprobs, prompt_logprobs=prompt)
            finished = True
            yield StepOutput([], finish, len(inputs.prompt_ids), len(ids))
        finally:
            if not finished:
                self.closed_early += 1


def make_client(repository: Path, pool: FakePool, **overrides: Any) -> TestClient:
    """The gateway app over `pool` (a fake Triton), as a test client on a loopback name."""
    settings = GatewaySettings(repository=repository, triton_urls=["fake:8001"], **overrides)
    app = create_app(settings, pool_factory=lambda _: pool)  # type: ignore[arg-type]
    return TestClient(app, base_url="http://localhost")  # a loopback name: auth off serves only those


def assert_openai_error(response: Any, status: int, fragment: str, param: str | None = None) -> dict:
    """The response is `status` with an error in the OpenAI shape whose message holds `fragment`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def sse_events(response: Any) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
