"""A random-weight Qwen2.5 (Qwen2's real tokenizer, Qwen2.5's published chat template with tools), exported.

The model is the ``qwen2.5`` family of ``tests/family_models.py`` (2 layers, hidden 64, random weights; the
tokenizer and template from llama.cpp's vocabulary files, which ``make test`` fetches), exported by the
toolkit's own exporter; the tests need only the export directory (graph + tokenizer files + template).
"""

from __future__ import annotations

from pathlib import Path

from tests import family_models as families

REPO_ROOT = Path(__file__).resolve().parents[2]
IM_END = 151645  # <|im_end|> in Qwen2's vocabulary


def export_random_qwen2(out_dir: Path, seed: int = 0) -> Path:
    """The random Qwen2.5 with its real tokenizer and template, exported to ``out_dir/onnx/model.onnx``."""
    from toolkit.export.torch_to_onnx import export_onnx

    hf_dir = families.make_model(families.FAMILIES["qwen2.5"], out_dir / "hf", seed=seed)
    return export_onnx(hf_dir, out_dir / "onnx")
