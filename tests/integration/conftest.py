"""Shared integration fixtures: ONNX exports, model repositories and a real Triton server on loopback.

``tiny_onnx``/``tiny_repository``: a small random Llama (SmolLM2's 49152-token vocabulary, so the
SmolLM2 tokenizer fixture renders prompts for it) exported with optimum once per session, in seconds.
``smollm_onnx``/``smollm_repository``: the embedded SmolLM2-135M-Instruct converted and exported once
and cached in pytest's cache directory (minutes the first time), for tests that need real text.
``triton_server``: a session-scoped tritonserver with the tiny generation model loaded (ports
18000-18002); the gateway tests reuse it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from toolkit.errors import ToolkitError
from toolkit.manifest import TOKENIZER_DIR, ModelManifest
from toolkit.serving import contract
from toolkit.serving.triton_server import TritonServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMOLLM_TOKENIZER = FIXTURES / "smollm2_tokenizer"
MODEL_PY = Path(__file__).resolve().parents[2] / "toolkit" / "serving" / "triton_model" / "model.py"
TINY_MODEL = "tiny-chat"
SMOLLM_MODEL = "smollm2-chat"
TRITON_HTTP_PORT, TRITON_GRPC_PORT, TRITON_METRICS_PORT = 18000, 18001, 18002
VOCAB = 49152
IM_END = 2  # SmolLM2's <|im_end|>, the end-of-turn (eos) token


@dataclass
class ServedRepository:
    path: Path
    model: str
    onnx: Path
    manifest: ModelManifest


@dataclass
class RunningTriton:
    grpc_url: str
    http_url: str
    metrics_url: str
    repository: Path
    model: str
    server: TritonServer


def export_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with SmolLM2's vocabulary, exported with optimum (a few seconds)."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=IM_END, pad_token_id=IM_END,
    )
    hf_dir = out_dir / "hf"
    LlamaForCausalLM(config).eval().save_pretrained(str(hf_dir))
    main_export(str(hf_dir), output=str(out_dir / "onnx"), task="text-generation-with-past", opset=18,
                device="cpu", do_validation=False)
    return out_dir / "onnx" / "model.onnx"


def _generation_config_text(name: str, parameters: dict[str, str]) -> str:
    """The generation model's config.pbtxt; the repository stage's builder when it is there."""
    try:
        from toolkit.triton_config import config_to_text, generation_model_config
    except ImportError:  # built here from the same protobuf schema until the repository stage lands
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as pb

        config = pb.ModelConfig(name=name, backend="python", max_batch_size=8)
        inputs = [(contract.INPUT_IDS, pb.TYPE_INT64, [-1]), (contract.MAX_TOKENS, pb.TYPE_INT32, [1]),
                  (contract.TEMPERATURE, pb.TYPE_FP32, [1]), (contract.TOP_P, pb.TYPE_FP32, [1]),
                  (contract.TOP_K, pb.TYPE_INT32, [1]), (contract.SEED, pb.TYPE_INT64, [1]),
                  (contract.REPETITION_PENALTY, pb.TYPE_FP32, [1]), (contract.STOP_TOKEN_IDS, pb.TYPE_INT64, [-1])]
        for tensor_name, dtype, dims in inputs:
            tensor = config.input.add(name=tensor_name, data_type=dtype, dims=dims)
            tensor.optional = tensor_name != contract.INPUT_IDS
            tensor.allow_ragged_batch = dims == [-1]
        for tensor_name, dtype in [(contract.OUTPUT_IDS, pb.TYPE_INT64), (contract.FINISH_REASON, pb.TYPE_STRING),
                                   (contract.PROMPT_TOKENS, pb.TYPE_INT32),
                                   (contract.COMPLETION_TOKENS, pb.TYPE_INT32)]:
            config.output.add(name=tensor_name, data_type=dtype, dims=[-1 if dtype == pb.TYPE_INT64 else 1])
        config.model_transaction_policy.decoupled = True
        config.dynamic_batching.preferred_batch_size.extend([4, 8])
        config.dynamic_batching.max_queue_delay_microseconds = 2000
        config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
        for key, value in parameters.items():
            config.parameters[key].string_value = value
        return text_format.MessageToString(config)
    return config_to_text(generation_model_config(
        name, max_batch_size=8, preferred_batch_sizes=[4, 8], max_queue_delay_us=2000, instance_count=1,
        parameters=parameters,
    ))


def write_generation_repository(
    root: Path, name: str, onnx: Path, *, context_length: int, version: int = 1, max_active: int = 32,
    max_new_tokens_limit: int = 512, tokenizer_dir: Path | None = SMOLLM_TOKENIZER,
) -> ServedRepository:
    """A minimal toolkit repository: ``<name>/<N>/`` (model.py, manifest, tokenizer) and
    ``<name>_onnx_fp32/<N>/model.onnx`` (symlinked: the graph is not copied)."""
    from toolkit.onnx_lm import OnnxCausalLM

    lm = OnnxCausalLM(onnx)
    core = f"{name}_onnx_fp32"
    core_dir = root / core / str(version)
    core_dir.mkdir(parents=True)
    (core_dir / "model.onnx").symlink_to(onnx.resolve())
    if (onnx.parent / "model.onnx_data").exists():
        (core_dir / "model.onnx_data").symlink_to((onnx.parent / "model.onnx_data").resolve())
    version_dir = root / name / str(version)
    version_dir.mkdir(parents=True)
    shutil.copy(MODEL_PY, version_dir / "model.py")
    template = ""
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, version_dir / TOKENIZER_DIR)
        template_file = tokenizer_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else ""
    manifest = ModelManifest(
        model_name=name, version=version, base_model="test", adapter_sha256=None, toolkit_version="test",
        built_at="2026-01-01T00:00:00Z", context_length=context_length, vocab_size=lm.vocab_size,
        num_layers=lm.num_layers, num_kv_heads=lm.num_kv_heads, head_dim=lm.head_dim, bos_token_id=1,
        eos_token_ids=[IM_END], stop_token_ids=[IM_END], pad_token_id=IM_END, chat_template=template,
        chat_template_sha256="", serving_core_model=core, precisions=["onnx_fp32"],
    )
    manifest.save(version_dir)
    parameters = {
        contract.PARAM_CORE_MODEL: core, contract.PARAM_RUNNER: "onnxruntime",
        contract.PARAM_MAX_ACTIVE: str(max_active), contract.PARAM_MAX_QUEUE: "64",
        contract.PARAM_MAX_NEW_TOKENS: str(max_new_tokens_limit), contract.PARAM_CONTEXT: str(context_length),
    }
    (root / name / "config.pbtxt").write_text(_generation_config_text(name, parameters))
    return ServedRepository(root, name, onnx, manifest)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_repository(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> ServedRepository:
    return write_generation_repository(tmp_path_factory.mktemp("tiny-repo"), TINY_MODEL, tiny_onnx,
                                       context_length=1024, max_new_tokens_limit=1000)


@pytest.fixture(scope="session")
def smollm_onnx(request: pytest.FixtureRequest) -> Path:
    """The embedded SmolLM2 converted from its GGUF and exported once; cached across sessions."""
    cache = Path(request.config.cache.mkdir("smollm2-onnx"))
    onnx = cache / "onnx" / "model.onnx"
    if onnx.is_file():
        return onnx
    try:
        from toolkit.stages.base_model import embedded_gguf_path, gguf_to_hf
        from toolkit.stages.export_onnx import export_onnx
    except ImportError as err:
        pytest.skip(f"the base-model or export stage is not available: {err}")
    try:
        hf_dir = cache / "hf"
        if not (hf_dir / "config.json").is_file():
            gguf_to_hf(embedded_gguf_path(), hf_dir)
        return export_onnx(hf_dir, cache / "onnx")
    except ToolkitError as err:
        pytest.skip(f"no SmolLM2 export: {err}")


@pytest.fixture(scope="session")
def smollm_repository(smollm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> ServedRepository:
    return write_generation_repository(tmp_path_factory.mktemp("smollm-repo"), SMOLLM_MODEL, smollm_onnx,
                                       context_length=2048, max_new_tokens_limit=1024)


@pytest.fixture(scope="session")
def triton_server(tiny_repository: ServedRepository, tmp_path_factory: pytest.TempPathFactory) -> \
        Iterator[RunningTriton]:
    """A real tritonserver on 127.0.0.1:18000-18002 serving the tiny generation model."""
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    server = TritonServer(tiny_repository.path, models=[tiny_repository.model], http_port=TRITON_HTTP_PORT,
                          grpc_port=TRITON_GRPC_PORT, metrics_port=TRITON_METRICS_PORT, log_path=log)
    server.start(ready_timeout_s=120)
    try:
        yield RunningTriton(server.grpc_url, server.http_url, server.metrics_url, tiny_repository.path,
                            tiny_repository.model, server)
    finally:
        server.stop()


def manifest_json(repo: ServedRepository) -> dict[str, object]:
    return json.loads((repo.path / repo.model / "1" / "manifest.json").read_text())
