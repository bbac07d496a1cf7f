"""A serving repository around an ONNX export, without the build: tests and the benchmark.

The repository stage's own :func:`~toolkit.repository.writer.write_repository`, fed with what the
build would read from the merged model (graph shape, stop and pad ids, tokenizer), so tests and
benchmarks serve exactly the layout and configs a build ships. The core model links to the export
(a symlink, not a copy), so the export must outlive the repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from toolkit.repository.manifest import BuildFacts, ModelManifest


@dataclass
class ServedRepository:
    path: Path
    model: str
    onnx: Path
    manifest: ModelManifest


def write_serving_repository(
    root: Path, name: str, onnx: Path, *, context_length: int, max_active: int = 32,
    max_queue: int = 64, max_new_tokens_limit: int = 512, tokenizer_dir: Path | None = None,
    stop_token_ids: Sequence[int] = (), pad_token_id: int = 0, max_batch_size: int = 8,
    build: BuildFacts | None = None, grammar_compile_timeout_s: float = 10.0,
) -> ServedRepository:
    """Write the generation model ``name`` (next version; 1 in a fresh ``root``) serving ``onnx`` on onnxruntime.

    ``tokenizer_dir`` (tokenizer.json, tokenizer_config.json, optional chat_template.jinja) is
    shipped beside the manifest for the gateway; without it the repository serves token ids only.
    ``build`` stands for the scores and gates a build records in the manifest.
    """
    from toolkit.buildsys.config import RepositorySection, ServingSection
    from toolkit.repository.contract import LMInfo
    from toolkit.repository.writer import ModelFacts, write_repository
    from toolkit.stages.model_repository import repository_spec

    template_file = tokenizer_dir / "chat_template.jinja" if tokenizer_dir is not None else None
    facts = ModelFacts(
        lm=LMInfo.from_onnx(onnx), bos_token_id=None, stop_token_ids=tuple(stop_token_ids),
        pad_token_id=pad_token_id, tokenizer_dir=tokenizer_dir,
        chat_template=template_file.read_text() if template_file is not None and template_file.is_file() else "",
    )
    written = write_repository(
        root, model_name=name, model=facts, onnx_fp32=onnx, base_model=str(onnx),
        spec=repository_spec(RepositorySection(max_batch_size=max_batch_size, runner="onnxruntime"),
                             ServingSection(max_active_sequences=max_active, max_queue=max_queue,
                                            max_new_tokens_limit=max_new_tokens_limit,
                                            grammar_compile_timeout_s=grammar_compile_timeout_s),
                             context_length=context_length),
        symlink_onnx=True, build=build,
    )
    return ServedRepository(root, name, onnx, written.manifest)
