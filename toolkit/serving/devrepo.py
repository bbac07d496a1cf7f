"""A minimal serving repository around an ONNX export, without the build: tests and the benchmark.

Same layout as the repository stage writes (``<name>/<N>/`` with model.py, manifest and tokenizer;
``<name>_onnx_fp32/<N>/model.onnx`` symlinked, not copied) and the same typed generation-model
config from :mod:`toolkit.triton_config`.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from toolkit.manifest import TOKENIZER_DIR, ModelManifest
from toolkit.serving import contract

MODEL_PY = Path(__file__).resolve().parent / "triton_model" / "model.py"


@dataclass
class ServedRepository:
    path: Path
    model: str
    onnx: Path
    manifest: ModelManifest


def write_serving_repository(
    root: Path, name: str, onnx: Path, *, context_length: int, version: int = 1, max_active: int = 32,
    max_queue: int = 64, max_new_tokens_limit: int = 512, tokenizer_dir: Path | None = None,
    stop_token_ids: Sequence[int] = (), pad_token_id: int = 0, max_batch_size: int = 8,
) -> ServedRepository:
    """Write the generation model ``name`` version ``version`` serving ``onnx`` into ``root``."""
    from toolkit.onnx_lm import OnnxCausalLM
    from toolkit.triton_config import generation_model_config, write_config

    lm = OnnxCausalLM(onnx)
    core = f"{name}_onnx_fp32"
    core_dir = root / core / str(version)
    core_dir.mkdir(parents=True)
    for file in (onnx, onnx.parent / "model.onnx_data"):
        if file.exists():
            (core_dir / file.name).symlink_to(file.resolve())
    version_dir = root / name / str(version)
    version_dir.mkdir(parents=True)
    shutil.copy(MODEL_PY, version_dir / "model.py")
    template = ""
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, version_dir / TOKENIZER_DIR)
        template_file = tokenizer_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else ""
    manifest = ModelManifest(
        model_name=name, version=version, base_model=str(onnx), adapter_sha256=None, toolkit_version="dev",
        built_at="1970-01-01T00:00:00Z", context_length=context_length, vocab_size=lm.vocab_size,
        num_layers=lm.num_layers, num_kv_heads=lm.num_kv_heads, head_dim=lm.head_dim, bos_token_id=None,
        eos_token_ids=list(stop_token_ids), stop_token_ids=list(stop_token_ids), pad_token_id=pad_token_id,
        chat_template=template, chat_template_sha256="", serving_core_model=core, precisions=["onnx_fp32"],
    )
    manifest.save(version_dir)
    parameters = {
        contract.PARAM_CORE_MODEL: core, contract.PARAM_RUNNER: "onnxruntime",
        contract.PARAM_MAX_ACTIVE: str(max_active), contract.PARAM_MAX_QUEUE: str(max_queue),
        contract.PARAM_MAX_NEW_TOKENS: str(max_new_tokens_limit), contract.PARAM_CONTEXT: str(context_length),
    }
    write_config(root / name, generation_model_config(
        name, max_batch_size=max_batch_size, preferred_batch_sizes=[b for b in (4, 8) if b <= max_batch_size],
        max_queue_delay_us=2000, instance_count=1, parameters=parameters,
    ))
    return ServedRepository(root, name, onnx, manifest)
