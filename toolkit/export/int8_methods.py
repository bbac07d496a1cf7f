"""INT8 variants of the FP32 KV-cache ONNX graph (onnxruntime's quantizers), and how to measure them.

Only the weight MatMuls of the decoder layers are quantized: the attention MatMuls multiply two
activations and ``lm_head`` (tied to the embeddings) decides every token, so both stay FP32.

Methods (``quantize.method``), measured on SmolLM2-135M-Instruct, 2 threads on a shared 2-core
CPU (speed ratios are noisy to +-30 %): free-running greedy agreement with FP32 on the 9 golden
prompts at batch 1 (24 new tokens), teacher-forced top-1 agreement, perplexity delta on held-out
assistant tokens, decode speed relative to FP32 at batch 1 / 8, size (FP32: 539 MB).

====================================  =========  ========  ========  ===========  ======
method                                greedy     forced    ppl       speed b1/b8  MB
====================================  =========  ========  ========  ===========  ======
int8_weight_only (default)            0.63       0.958     +1.8 %    1.35/1.22    234
int8_weight_only, down_proj excluded  0.80       0.970     +1.6 %    1.35/1.05    310
int8_weight_only, accuracy_level 1    0.77       0.976     +0.8 %    0.27/0.45    234
dynamic_per_channel                   0.30       -         +91 %     -            222
dynamic_per_channel, no down_proj     0.62       -         -0.5 %    -            302
dynamic (per tensor)                  0.15       -         +102 %    0.94/0.77    222
static_qdq (MinMax)                   0.015      0.375     +1165 %   0.28/0.59    222
static_qdq (MinMax), no down_proj     0.42       0.875     +15 %     0.23/0.49    302
static_qdq_percentile, no down_proj   0.09       0.655     +110 %    0.22/0.31    302
====================================  =========  ========  ========  ===========  ======

``int8_weight_only`` is MatMulNBits with symmetric 8-bit weights in blocks of 32 and int8
compute (accuracy level 4): the only variant that is both faster than FP32 and close to it per
token. Free-running agreement understates it: SmolLM2's first token for "What is the capital
of France?" is a near tie ("The" 25.33 vs "L" 25.24), so any perturbation rewrites that reply.
Per-tensor activation scales (dynamic, static Q/DQ) break on the outliers entering down_proj.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.errors import StageError
from toolkit.model_io.onnx_files import (
    MAX_PROTO_BYTES,
    load_graph,
    load_onnx,
    needs_external_data,
    onnx_bytes,
    save_onnx,
)
from toolkit.repository.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past_names

if TYPE_CHECKING:
    import onnx

    from toolkit.runtime.onnx_lm import OnnxCausalLM

INT8_FILE = "model_int8.onnx"
QDQ_FILE = "model_qdq.onnx"
WEIGHT_ONLY_BLOCK = 32
CALIBRATION_WINDOW = 128  # tokens a static-calibration feed holds
CALIBRATION_MAX_TOKENS = 1024  # tokens of one conversation a GPTQ calibration feed holds
GPTQ_METHODS = ("int8_weight_only_gptq", "weight_only_gptq_qdq")


# --------------------------------------------------------------------------- graph selection


def weight_matmuls(model: onnx.ModelProto, exclude_lm_head: bool = True) -> list[str]:
    """Names of MatMul nodes whose second input is a weight (initializer), lm_head excluded."""
    inits = {init.name for init in model.graph.initializer}
    logits_nodes = {node.name for node in model.graph.node if LOGITS in node.output}
    return [
        node.name for node in model.graph.node
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits
        and not (exclude_lm_head and node.name in logits_nodes)
    ]


def matmul_labels(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> "node name + PyTorch weight name" for every node, what ``exclude`` patterns match.

    The dynamo exporter names the projections ``node_linear_N``; which weight a node multiplies by
    (``p_model_model_layers_0_mlp_down_proj_weight``) is only in its ``pkg.torch.onnx.fx_node``
    metadata, so a pattern such as ``down_proj`` is matched against both.
    """
    labels = {}
    for node in model.graph.node:
        fx = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
        weight = re.search(r"%(p_\w+)", fx)
        labels[node.name] = f"{node.name} {weight.group(1)}" if weight else node.name
    return labels


def selected_matmuls(model: onnx.ModelProto, exclude: Sequence[str]) -> list[str]:
    """The weight MatMuls (lm_head excluded) whose node or weight name contains none of `exclude`."""
    labels = matmul_labels(model)
    return [n for n in weight_matmuls(model) if not any(part in labels[n] for part in exclude)]


def calibration_windows(samples: Sequence[Sequence[int]], window: int) -> list[list[int]]:
    """The samples' tokens as one stream cut into equal windows.

    onnxruntime's histogram calibrators (percentile, entropy) stack each tensor across feeds, so
    every feed must have the same shape; a stream shorter than one window is a single feed.
    """
    stream = [token for sample in samples for token in sample]
    if len(stream) <= window:
        return [stream] if stream else []
    return [stream[i: i + window] for i in range(0, len(stream) - window + 1, window)]


class CalibrationReader:
    """onnxruntime CalibrationDataReader: prefill feeds (empty KV cache) of equal length."""

    def __init__(self, samples: Sequence[Sequence[int]], num_layers: int, kv_heads: int, head_dim: int,
                 window: int | None = CALIBRATION_WINDOW):
        """`window`: cut the samples' token stream into feeds of this length; None: one feed per sample."""
        self._samples = calibration_windows(samples, window) if window else [list(ids) for ids in samples if ids]
        self._shape = (1, kv_heads, 0, head_dim)
        self._layers = num_layers
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self._samples)

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for ids in self._samples:
            feed = {
                INPUT_IDS: np.asarray([ids], dtype=np.int64),
                ATTENTION_MASK: np.ones((1, len(ids)), dtype=np.int64),
                POSITION_IDS: np.arange(len(ids), dtype=np.int64)[None, :],
            }
            for name in past_names(self._layers):
                feed[name] = np.zeros(self._shape, dtype=np.float32)
            yield feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._feeds()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


# --------------------------------------------------------------------------- quantizers


def quantize_int8(
    fp32_path: Path, out_path: Path, method: str, calibration: Sequence[Sequence[int]] = (),
    *, exclude: Sequence[str] = (), accuracy_level: int = 4,
) -> Path:
    """Write the `method` quantization of the FP32 KV-cache graph to `out_path`; return it.

    `calibration` (token id lists) is needed by the static methods only. Weight MatMuls whose node
    or weight name contains one of `exclude` stay FP32 (:func:`selected_matmuls`).
    """
    import onnx

    if method in GPTQ_METHODS and not calibration:
        raise StageError("GPTQ needs calibration samples; the training split and control examples gave none")
    graph_only = onnx.load(str(fp32_path), load_external_data=False)
    nodes = selected_matmuls(graph_only, exclude)
    big = onnx_bytes(fp32_path) > MAX_PROTO_BYTES  # onnxruntime's quantizers then write external data too
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if method in ("dynamic_per_channel", "dynamic"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(fp32_path, out_path, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                         per_channel=method == "dynamic_per_channel", weight_type=QuantType.QInt8,
                         use_external_data_format=big, extra_options={"MatMulConstBOnly": True})
    elif method in ("int8_weight_only", "int8_weight_only_gptq", "int4_weight_only"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = load_onnx(fp32_path)
        excluded = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(nodes)]
        quantizer = MatMulNBitsQuantizer(
            model, bits=4 if method == "int4_weight_only" else 8, block_size=WEIGHT_ONLY_BLOCK,
            is_symmetric=True, accuracy_level=accuracy_level, nodes_to_exclude=excluded,
        )
        quantizer.process()
        del model  # the quantizer works on its own copy
        if method == "int8_weight_only_gptq":
            gptq_matmul_nbits(quantizer.model.model, model_path=fp32_path, calibration=calibration)
        quantizer.model.save_model_to_file(str(out_path),
                                           use_external_data_format=needs_external_data(quantizer.model.model))
    elif method == "weight_only_qdq":
        quantize_weight_only_qdq(fp32_path, out_path, nodes)
    elif method == "weight_only_gptq_qdq":
        quantize_weight_only_qdq(fp32_path, out_path, nodes, calibration=calibration)
    elif method in ("static_qdq", "static_qdq_percentile"):
        quantize_qdq(fp32_path, out_path, calibration, nodes, "minmax" if method == "static_qdq" else "percentile",
                     big=big)
    else:
        raise StageError(f"quantize.method: unknown method {method!r}")
    return out_path


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: Sequence[Sequence[int]], nodes: list[str],
                 calibrate: str = "minmax", big: bool = False) -> Path:
    """Static Q/DQ: symmetric int8 per-channel weights, symmetric activations (what TensorRT expects)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from toolkit.runtime.onnx_lm import OnnxCausalLM

    if not calibration:
        raise StageError("static Q/DQ quantization needs calibration samples; the training split gave none")
    shape = OnnxCausalLM(fp32_path, providers=["CPUExecutionProvider"])
    reader = CalibrationReader(calibration, shape.num_layers, shape.num_kv_heads, shape.head_dim)
    del shape
    quantize_static(
        fp32_path, out_path, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes, per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        use_external_data_format=big,
        calibrate_method=CalibrationMethod.MinMax if calibrate == "minmax" else CalibrationMethod.Percentile,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": 99.99,
                       "MatMulConstBOnly": True},
    )
    return out_path


HESSIAN_BUDGET_BYTES = 1 << 30  # float64 Hessians held at once; more inputs take another calibration pass


def input_hessians(model_path: Path, inputs: Sequence[str], calibration: Sequence[Sequence[int]],
                   ) -> Iterator[dict[str, np.ndarray]]:
    """The mean of x xᵀ over the calibration tokens ([K, K], float64) for each named activation input
    of the FP32 graph at `model_path`.

    Each named tensor becomes a graph output and every calibration conversation is prefilled on
    onnxruntime as one feed; the inputs come in groups of at most ``HESSIAN_BUDGET_BYTES`` (one pass
    over the conversations per group), so a big model's Hessians are never all held at once. The graph
    is read without its external data (onnxruntime reads that from the graph's folder): a model over
    2 GiB is never serialized whole, and the caller's own copy of the weights is not doubled here.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = load_graph(model_path)
    wanted = set(inputs)
    inits = {init.name: init for init in model.graph.initializer}
    widths = {node.input[0]: int(inits[node.input[1]].dims[0]) for node in model.graph.node
              if node.op_type == "MatMul" and node.input[0] in wanted and node.input[1] in inits}
    known = {out.name for out in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in widths if name not in known)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    # one feed per conversation (no windows across conversations), at most CALIBRATION_MAX_TOKENS long
    reader = CalibrationReader([ids[:CALIBRATION_MAX_TOKENS] for ids in calibration], len(past) // 2,
                               int(past[0].shape[1]), int(past[0].shape[3]), window=None)
    groups: list[list[str]] = [[]]
    used = 0
    for name in sorted(widths):
        size = widths[name] ** 2 * 8
        if groups[-1] and used + size > HESSIAN_BUDGET_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    for group in groups:
        sums = {name: np.zeros((widths[name], widths[name])) for name in group}
        count = 0
        reader.rewind()
        while (feed := reader.get_next()) is not None:
            for name, x in zip(group, session.run(group, feed), strict=True):
                flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
                sums[name] += flat.T @ flat
            count += int(feed[INPUT_IDS].size)
        yield {name: total / max(count, 1) for name, total in sums.items()}


def gptq_int8(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, *, block: int = 128,
              damp: float = 0.01, qmin: int = -127, qmax: int = 127) -> np.ndarray:
    """GPTQ rounding of a MatMul weight [K, N] to INT8 on fixed scales: one per output channel ([N]) or
    one per weight ([K, N], e.g. a block scale repeated over its rows).

    Rows (input channels) are rounded one at a time and each row's rounding error is spread over
    the rows not yet rounded, weighted by the inverse Hessian of the layer's inputs, so the layer's
    output on the calibration inputs moves as little as possible (Frantar et al., "GPTQ", 2022;
    the lazy-batch form, no reordering). The result is an ordinary symmetric INT8 weight that
    ``q * scale`` dequantizes, as for round-to-nearest; with uncorrelated inputs (diagonal Hessian)
    it is round-to-nearest.
    """
    w = weight.astype(np.float64)  # a copy
    k = w.shape[0]
    h = hessian.astype(np.float64)  # a copy
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    # Upper Cholesky factor of H⁻¹: row i holds how row i's error moves the rows after it.
    h_inv = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros(w.shape, dtype=np.int8)
    for start in range(0, k, block):
        end = min(start + block, k)
        rows = w[start:end].copy()
        errors = np.zeros_like(rows)
        part = h_inv[start:end, start:end]
        for i in range(end - start):
            row_scale = scale if scale.ndim == 1 else scale[start + i]
            rounded = np.clip(np.rint(rows[i] / row_scale), qmin, qmax)
            q[start + i] = rounded
            errors[i] = (rows[i] - rounded * row_scale) / part[i, i]
            rows[i:] -= np.outer(part[i, i:], errors[i])
        w[end:] -= h_inv[start:end, end:].T @ errors
    return q


def gptq_matmul_nbits(model: onnx.ModelProto, *, model_path: Path, calibration: Sequence[Sequence[int]]) -> None:
    """Re-round the 8-bit MatMulNBits weights of `model` (onnxruntime's symmetric block quantization of
    the FP32 graph at `model_path`) by GPTQ on onnxruntime's own block scales.

    onnxruntime stores B as [N, blocks, block] uint8 with the implicit zero point 128 and a signed
    scale per (N, block); the FP32 weight is the initializer B was made from (its name without
    ``_Q8``). Only the integers change: format, scales and kernels stay onnxruntime's.
    """
    from onnx import numpy_helper

    fp32 = load_onnx(model_path)
    float_weights = {init.name: init for init in fp32.graph.initializer}
    inits = {init.name: init for init in model.graph.initializer}
    todo: dict[str, list[onnx.NodeProto]] = {}  # activation input -> its MatMulNBits nodes
    for node in model.graph.node:
        bits = next((a.i for a in node.attribute if a.name == "bits"), 0)
        if node.op_type == "MatMulNBits" and bits == 8 and len(node.input) == 3 \
                and node.input[1].endswith("_Q8") and node.input[1][: -len("_Q8")] in float_weights:
            todo.setdefault(node.input[0], []).append(node)
    for hessians in input_hessians(model_path, list(todo), calibration):
        for source, hessian in hessians.items():
            for node in todo[source]:
                packed = numpy_helper.to_array(inits[node.input[1]])  # [N, blocks, block]
                n, blocks, size = packed.shape
                w = numpy_helper.to_array(float_weights[node.input[1][: -len("_Q8")]]).astype(np.float32)
                k = w.shape[0]
                scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks)
                row_scale = np.repeat(scales.T.astype(np.float64), size, axis=0)[:k]  # [K, N]
                q = gptq_int8(w, hessian, row_scale, qmin=-128, qmax=127).astype(np.int16) + 128
                padded = np.full((blocks * size, n), 128, dtype=np.int16)
                padded[:k] = q
                packed = padded.reshape(blocks, size, n).transpose(2, 0, 1).astype(np.uint8)
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(packed, node.input[1]))


def quantize_weight_only_qdq(fp32_path: Path, out_path: Path, nodes: Sequence[str],
                             calibration: Sequence[Sequence[int]] = ()) -> Path:
    """Weight-only INT8 Q/DQ: each listed MatMul's weight [K, N] becomes INT8 + a DequantizeLinear.

    Symmetric per output channel (axis 1 of the MatMul's [K, N] weight, zero point 0, range
    -127..127); activations stay float. The INT8 values are rounded to nearest or, given
    `calibration` (token id lists), by GPTQ (:func:`gptq_int8`, on :func:`input_hessians`): same
    format, same scales, less output error. TensorRT reads such a graph as
    pre-quantized weights with "an IDequantizeLayer ... between the weights and the linear operator
    that uses them" (TensorRT developer guide, Explicit Quantization, "Quantized Weights"); see
    :mod:`toolkit.repository.plan_script` for what its documentation does and does not promise about the
    GEMM it builds from it. onnxruntime executes DequantizeLinear -> MatMul as written.
    """
    from onnx import helper, numpy_helper

    model = load_onnx(fp32_path)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    wanted = set(nodes)
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    # float weight -> (its MatMul's activation input, per-channel scale, INT8 values)
    quantized: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    for node in graph.node:
        if node.name in wanted and node.input[1] not in quantized:
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            scale = np.abs(w).max(axis=0) / 127.0
            scale[scale == 0] = 1.0
            quantized[node.input[1]] = (node.input[0], scale, np.clip(np.rint(w / scale), -127, 127).astype(np.int8))
    if calibration:
        by_input: dict[str, list[str]] = {}  # q, k and v (gate and up) share their input, so its Hessian
        for weight, (source, _, _) in quantized.items():
            by_input.setdefault(source, []).append(weight)
        for hessians in input_hessians(fp32_path, list(by_input), calibration):
            for source, hessian in hessians.items():
                # The weights that share an input share its Hessian, and GPTQ treats every output column
                # on its own: one pass over their columns side by side rounds them as separate passes
                # would, for one Python loop over the rows instead of one per weight (the loop is the cost).
                weights = by_input[source]
                w = np.concatenate([numpy_helper.to_array(inits[name]).astype(np.float32) for name in weights], axis=1)
                scale = np.concatenate([quantized[name][1] for name in weights])
                q = gptq_int8(w, hessian, scale.astype(np.float64))
                start = 0
                for name in weights:
                    width = quantized[name][1].shape[0]
                    quantized[name] = (source, quantized[name][1], q[:, start: start + width])
                    start += width
    dequantized: dict[str, str] = {}  # float weight -> DequantizeLinear output
    dq_nodes: list[onnx.NodeProto] = []
    for weight, (_, scale, q) in quantized.items():
        base = weight.replace("/", "_").replace(":", "_")
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{base}_quantized"),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), f"{base}_zero_point"),
        ])
        dequantized[weight] = f"{base}_dequantized"
        dq_nodes.append(helper.make_node(
            "DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
            [dequantized[weight]], name=f"{base}_DequantizeLinear", axis=1))
    for node in graph.node:
        if node.name in wanted:
            consumers[node.input[1]] -= 1
            node.input[1] = dequantized[node.input[1]]
    for weight in dequantized:
        if consumers[weight] == 0:
            graph.initializer.remove(inits[weight])
    # DequantizeLinear reads only initializers, so ahead of every node is a valid topological place.
    nodes_after = list(graph.node)
    del graph.node[:]
    graph.node.extend(dq_nodes + nodes_after)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return save_onnx(model, out_path)


# --------------------------------------------------------------------------- measurements


def perplexity(model: OnnxCausalLM, examples: Sequence[tuple[Sequence[int], Sequence[int]]],
               max_tokens: int | None = None) -> float:
    """exp(mean NLL) over labelled tokens; each example is (input_ids, labels with -100 elsewhere).

    The logits come a chunk of positions at a time (:meth:`OnnxCausalLM.sequence_logits`) and only the
    labelled rows are scored: a 1,000-token example at a 152k vocabulary is 0.6 GB of logits at once.
    """
    nll = 0.0
    count = 0
    for ids, labels in examples:
        targets = np.asarray(list(labels[1:]) + [-100])  # position i predicts token i + 1
        if not (targets != -100).any():
            continue
        for start, logits in model.sequence_logits(ids, max_tokens):
            chunk = targets[start: start + len(logits)]
            keep = chunk != -100
            if not keep.any():
                continue
            rows = logits[keep].astype(np.float64)
            rows -= rows.max(axis=-1, keepdims=True)
            logprobs = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
            nll -= float(logprobs[np.arange(len(rows)), chunk[keep]].sum())
            count += int(keep.sum())
    if count == 0:
        raise StageError("no assistant tokens to score perplexity on; the test split is empty")
    return float(np.exp(nll / count))


def decode_tokens_per_s(model: OnnxCausalLM, prompts: Sequence[Sequence[int]], new_tokens: int, repeats: int = 2,
                        ) -> float:
    """Generated tokens per second of a fixed-length greedy decode (no stop tokens), best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        model.greedy(prompts, new_tokens, stop_ids=[], pad_id=0)
        best = min(best, time.perf_counter() - started)
    return len(prompts) * new_tokens / best


def teacher_forced_agreement(model: OnnxCausalLM, prompts: Sequence[Sequence[int]],
                             completions: Sequence[Sequence[int]], max_tokens: int | None = None,
                             ) -> tuple[int, int]:
    """(argmax hits, positions): `model` fed the reference's own greedy tokens, does it pick each next one?

    Unlike free-running agreement, one near-tie flip early on does not turn the rest of the
    reply into a mismatch, so this isolates per-token accuracy.
    """
    hits = total = 0
    for prompt, completion in zip(prompts, completions, strict=True):
        if not completion:
            continue
        ids = list(prompt) + list(completion)
        wanted = np.asarray(ids[1:] + [-1])  # position i predicts token i + 1; only the completion's count
        wanted[: len(prompt) - 1] = -1
        for start, logits in model.sequence_logits(ids, max_tokens):
            chunk = wanted[start: start + len(logits)]
            scored = chunk >= 0
            if scored.any():
                hits += int((logits[scored].argmax(axis=-1) == chunk[scored]).sum())
        total += len(completion)
    return hits, total
