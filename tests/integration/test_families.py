"""Every supported model family through the whole build, a real Triton and the gateway.

For each family (``tests/family_models.py``: a tiny random-weight model of the family's architecture with its real
tokenizer and chat template), ``toolkit build`` runs every stage as a user runs it: LoRA fine-tune on a small
dataset whose answers are one word, so the tuned model learns to end its turn with the family's own
end-of-turn token; merge and the portability gates; ONNX export with the exact parity gates; INT8 and the
Q/DQ graph; the TensorRT scripts; the repository. All families go into one repository, served by one
Triton and one gateway. The expected values come from elsewhere: llama.cpp's token test vectors, the
published template (llama.cpp's copy) rendered by plain jinja2 over the raw tokenizers library, and
transformers' ``generate`` on the merged model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import family_models as families
from tests import tinybuild
from tests.integration.conftest import Gateway, gateway_over_triton, wait_ready
from tests.reference import ReferenceTokenizer
from tests.tinybuild import CONVERSATIONS, served_name

# Seven builds, then one Triton for all: the module's first test waits for every build (about 3 minutes on
# two idle cores), so it gets twice the suite's per-test limit.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

HTTP_PORT, GRPC_PORT, METRICS_PORT, GATEWAY_PORT = 18500, 18501, 18502, 18510
TIMEOUT_S = 120.0
FAMILY_NAMES = tuple(families.FAMILIES)
# The token each family's template writes after an assistant reply, as its model card documents it.
END_OF_TURN = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3.2": "<|eot_id|>", "mistral": "</s>",
               "phi3": "<|end|>", "gemma3": "<turn|>", "gemma2": "<turn|>"}
@dataclass
class Built:
    repository: Path
    roots: dict[str, Path]  # family -> its folder (base/, ws/)

    def base(self, family: str) -> Path:
        return self.roots[family] / "base"

    def workspace(self, family: str) -> Path:
        return self.roots[family] / "ws"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Every family built into one repository, two builds at a time (one thread each)."""
    root = tmp_path_factory.mktemp("families")
    workspaces = tinybuild.build_families(FAMILY_NAMES, root)
    return Built(root / "repository", {name: ws.parent for name, ws in workspaces.items()})


@pytest.fixture(scope="module")
def gateway(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    logs = tmp_path_factory.mktemp("families-serving")
    models = [served_name(n) for n in FAMILY_NAMES]
    with gateway_over_triton(built.repository, models, (HTTP_PORT, GRPC_PORT, METRICS_PORT), GATEWAY_PORT,
                             logs) as running:
        wait_ready(running, TIMEOUT_S)
        yield running


@pytest.fixture(scope="module")
def oai(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def _report(built: Built, family: str) -> dict[str, Any]:
    return json.loads((built.workspace(family) / "report.json").read_text())


def _stage(built: Built, family: str, name: str) -> dict[str, Any]:
    return next(s for s in _report(built, family)["stages"] if s["name"] == name)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_stage_ran_and_every_gate_passed(built: Built, family: str) -> None:
    report = _report(built, family)
    assert report["status"] == "passed"
    statuses = {s["name"]: s["status"] for s in report["stages"]}
    assert statuses == {**{name: "ran" for name in statuses}, "tensorrt": "unavailable", "triton_gate": "unavailable"}
    gates = {g["name"]: g for s in report["stages"] for g in s["gates"]}
    for name in ("portable_base_model_files", "merged_equals_adapter", "portable_model_files",
                 "onnx_fp32_batch1_greedy_agreement", "onnx_fp32_batch8_greedy_agreement",
                 "onnx_fp32_batch1_max_abs_logit_delta", "onnx_fp32_batch8_max_abs_logit_delta"):
        assert gates[name]["passed"], (name, gates[name]["detail"])
    adapter = json.loads((built.workspace(family) / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert len(adapter["target_modules"]) >= 3  # attention and MLP projections found, fused ones included
    repo = built.repository
    name = served_name(family)
    assert (repo / f"{name}_onnx_fp32" / "1" / "model.onnx").is_file()
    assert (repo / f"{name}_onnx_int8" / "1" / "model.onnx").is_file()
    assert "trtexec" in (repo / f"{name}_trt_fp16" / "build_plan.sh").read_text()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_repository_tokenizer_gives_llama_cpp_test_vectors(built: Built, family: str) -> None:
    from gateway.tokenization import load_tokenizer

    tokenizer_dir = built.repository / served_name(family) / "1" / "tokenizer"
    gateway_tokenizer = load_tokenizer(tokenizer_dir)  # what the gateway serves with
    raw = ReferenceTokenizer(tokenizer_dir).raw
    vectors = families.vocab_vectors(families.FAMILIES[family])
    assert len(vectors) >= 40
    for text, ids in vectors:
        assert gateway_tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
        assert raw.encode(text, add_special_tokens=False).ids == ids, text


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_manifest_stops_on_every_end_id_of_the_family(built: Built, family: str) -> None:
    manifest = json.loads((built.repository / served_name(family) / "1" / "manifest.json").read_text())
    reference = ReferenceTokenizer(built.base(family))
    expected = {reference.token_id(END_OF_TURN[family]), *families.FAMILIES[family].eos_ids}
    assert expected <= set(manifest["stop_token_ids"])


def _transformers_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int, stops: list[int] | None) -> list[int]:
    """transformers' generate on the merged model; `stops` None runs past every end token (ignore_eos)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = stops
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None,
                             top_p=None, top_k=None, eos_token_id=stops, pad_token_id=0)
    ids: list[int] = out[0, len(prompt):].tolist()
    if stops is not None:
        ids = ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]
    return ids


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gateway_renders_the_family_template_and_answers_like_transformers(
        built: Built, oai: openai.OpenAI, family: str) -> None:
    # The published template (llama.cpp's copy) over the fixture's own tokenizer.json: nothing the build wrote.
    family_def = families.FAMILIES[family]
    reference = ReferenceTokenizer(built.base(family), template=families.template_text(family_def))
    stops = sorted({reference.token_id(END_OF_TURN[family]), *family_def.eos_ids})
    merged = built.workspace(family) / "merge" / "model"
    ended = 0
    for messages in CONVERSATIONS:
        prompt = reference.render_ids(messages)
        reply = oai.chat.completions.create(model=served_name(family), messages=messages, max_tokens=12,
                                            temperature=0)
        assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt)
        expected = _transformers_greedy(merged, prompt, 12, stops)
        ended += len(expected) < 12
        assert reply.choices[0].finish_reason == ("stop" if len(expected) < 12 else "length")
        assert reply.choices[0].message.content == reference.decode(expected)
        assert reply.usage.completion_tokens == len(expected)
        # Past the end of turn (ignore_eos): 16 tokens of the random model, token for token.
        long = oai.chat.completions.create(model=served_name(family), messages=messages, max_tokens=16,
                                           temperature=0, extra_body={"ignore_eos": True})
        expected = _transformers_greedy(merged, prompt, 16, None)
        assert long.choices[0].finish_reason == "length"
        assert long.usage is not None and long.usage.completion_tokens == len(expected) == 16
        assert long.choices[0].message.content == reference.decode(expected)
        # Streamed, the deltas (decoded incrementally: SentencePiece's leading space, byte fallback) add up alike.
        stream = oai.chat.completions.create(model=served_name(family), messages=messages, max_tokens=16,
                                             temperature=0, stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reference.decode(expected)
    assert ended, "the tuned model should end its turn at least once, so its end-of-turn id is exercised"
