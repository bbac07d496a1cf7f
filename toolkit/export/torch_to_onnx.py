"""A merged causal LM as an ONNX graph with a KV cache (``torch.onnx`` dynamo exporter), and its facts.

The graph has the interface of optimum's ``text-generation-with-past`` export: inputs ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.N.key/value``; outputs ``logits`` and
``present.N.key/value``; batch, sequence and past length all dynamic (the names are
:mod:`toolkit.repository.contract`'s).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from toolkit.errors import StageError
from toolkit.model_io.onnx_files import external_data_names
from toolkit.model_io.tokenizer_files import copy_tokenizer_files
from toolkit.repository.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    is_past,
    past_layers,
    past_names,
    present_names,
)

MODEL_FILE = "model.onnx"
TASK = "text-generation-with-past"
EXPORTER = "torch.onnx (dynamo)"
GROUPED_ATTENTION = "toolkit_grouped"


def export_onnx(model_dir: Path, out_dir: Path, opset: int = 18) -> Path:
    """Export the causal LM in `model_dir` to `out_dir/model.onnx` with a KV cache; return its path.

    ``torch.onnx.export(dynamo=True)`` of a flat-tensor wrapper (:func:`_kv_wrapper`) with the
    tensor names optimum's ``text-generation-with-past`` export uses, so Triton configs, runners
    and TensorRT profiles read any such graph. The model's config, generation config and
    tokenizer files are copied beside the graph unchanged.
    """
    import torch

    from toolkit.model_io.modeling import load_model

    model = load_model(model_dir)
    _use_grouped_attention(model)
    cfg = model.config
    layers = int(cfg.num_hidden_layers)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    # Example shapes all distinct and above 1, so no dimension is specialised away; every one is Dim.AUTO.
    batch, seq, past = 2, 3, 5
    args = (
        torch.ones(batch, seq, dtype=torch.long), torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).repeat(batch, 1),
        *[torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * layers)],
    )
    auto = torch.export.Dim.AUTO
    dynamic = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto},
               tuple({0: auto, 2: auto} for _ in range(2 * layers)))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    try:
        program = torch.onnx.export(
            _kv_wrapper(model, layers), args, None, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
            input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(layers)],
            output_names=[LOGITS, *present_names(layers)],
        )
        if program is None:
            raise StageError("torch.onnx.export(dynamo=True) returned no program")
        program.save(str(path))
    except (ImportError, RuntimeError, ValueError, torch.onnx.OnnxExporterError) as err:
        raise StageError(f"torch.onnx export of {model_dir} failed: {str(err).splitlines()[0]}") from err
    copy_tokenizer_files(model_dir, out_dir)
    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    return path


def grouped_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                      dropout: float = 0.0, softcap: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """Attention in which each KV head serves its group of query heads through a reshape, not a copy.

    Hugging Face's eager and SDPA paths first repeat every KV head for each query head of its
    group (``repeat_kv``), and the exported graph does that on the whole cache at every decode step:
    an Expand to ``heads/kv_heads`` times the cache, then a transpose and a scale of that copy,
    which at batch 16 moved more memory than the weights. Here the query heads are regrouped instead
    (``[b, heads, s, d] -> [b, kv_heads, group * s, d]``, the layout ``repeat_kv`` implies), the
    cache is used as it is, and the scale is applied to the small score matrix. The result equals
    SDPA's to float rounding. ``softcap`` (Gemma 2) caps the scores as the eager attention does,
    ``tanh(s / cap) * cap``, before the mask. Sliding windows arrive in the mask. Dropout is ignored
    (export is inference only).
    """
    import torch

    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.matmul(query.reshape(batch, kv_heads, group * seq, dim), key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:  # additive [b, 1, s, past + s] (the eager mask)
        length = key.shape[-2]
        scores = scores.reshape(batch, kv_heads, group, seq, length) + attention_mask[:, :, None, :, :length]
        scores = scores.reshape(batch, kv_heads, group * seq, length)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value).reshape(batch, heads, seq, dim).transpose(1, 2).contiguous()
    return out, None


def _use_grouped_attention(model: Any) -> None:
    """Export with :func:`grouped_attention` (registered with transformers' attention interfaces)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)
    model.set_attn_implementation(GROUPED_ATTENTION)


def _kv_wrapper(model: Any, num_layers: int) -> Any:
    """The model as a flat-tensor module: (ids, mask, positions, *past) -> (logits, *present)."""
    import torch
    from transformers import DynamicCache

    class FlatKV(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            cache = DynamicCache()
            for layer in range(num_layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return FlatKV().eval()


def graph_stats(onnx_path: Path) -> dict[str, Any]:
    """Size on disk (graph plus external data), node count, opset and KV layout of an ONNX graph."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    external = external_data_names(model)
    size = onnx_path.stat().st_size + sum((onnx_path.parent / name).stat().st_size for name in external)
    inputs = [i.name for i in model.graph.input]
    ops = {op.domain or "ai.onnx": op.version for op in model.opset_import}
    return {
        "graph_bytes": size,
        "graph_mib": round(size / 2**20, 1),
        "node_count": len(model.graph.node),
        "opset": ops.get("ai.onnx"),
        "external_data_files": external,
        "kv_layers": len(past_layers(inputs)),
        "inputs": [name for name in inputs if not is_past(name)],
    }
