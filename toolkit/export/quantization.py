"""Stage ``quantize``: an INT8 ONNX variant of the FP32 graph, gated on fidelity and timed against FP32.

Calibration samples are training conversations rendered with the model's chat template. Only
the weight MatMuls of the decoder layers are quantized: the attention MatMuls multiply two
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

The gate is not blocking: a variant that fails it is reported with ``int8_shipped: False`` and the
repository stage leaves it out. The stage also writes ``model_qdq.onnx`` (static Q/DQ, symmetric,
MinMax-calibrated on the same samples, ``quantize.qdq_exclude_nodes`` left FP32): TensorRT
builds its INT8 plan from explicit Q/DQ.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.config import QuantizeSection
from toolkit.errors import StageError
from toolkit.gates import onnx_agreement, parity_gates, render_conversations
from toolkit.golden import Messages, golden_conversations
from toolkit.pipeline import StageContext, StageResult
from toolkit.report import GateResult

if TYPE_CHECKING:
    import onnx

    from toolkit.onnx_lm import OnnxCausalLM

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"
QDQ_FILE = "model_qdq.onnx"
WEIGHT_ONLY_BLOCK = 32
CALIBRATION_WINDOW = 128  # tokens a calibration feed holds


# --------------------------------------------------------------------------- graph selection


def weight_matmuls(model: onnx.ModelProto, exclude_lm_head: bool = True) -> list[str]:
    """Names of MatMul nodes whose second input is a weight (initializer), lm_head excluded."""
    inits = {init.name for init in model.graph.initializer}
    logits_nodes = {node.name for node in model.graph.node if "logits" in node.output}
    return [
        node.name for node in model.graph.node
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits
        and not (exclude_lm_head and node.name in logits_nodes)
    ]


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
                 window: int = CALIBRATION_WINDOW):
        self._samples = calibration_windows(samples, window)
        self._shape = (1, kv_heads, 0, head_dim)
        self._layers = num_layers
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self._samples)

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for ids in self._samples:
            feed = {
                "input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
                "position_ids": np.arange(len(ids), dtype=np.int64)[None, :],
            }
            for layer in range(self._layers):
                feed[f"past_key_values.{layer}.key"] = np.zeros(self._shape, dtype=np.float32)
                feed[f"past_key_values.{layer}.value"] = np.zeros(self._shape, dtype=np.float32)
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

    `calibration` (token id lists) is needed by ``static_qdq`` only. Weight MatMuls whose name
    contains one of `exclude` stay FP32.
    """
    import onnx

    model = onnx.load(str(fp32_path))
    nodes = [n for n in weight_matmuls(model) if not any(part in n for part in exclude)]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if method in ("dynamic_per_channel", "dynamic"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(fp32_path, out_path, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                         per_channel=method == "dynamic_per_channel", weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
    elif method in ("int8_weight_only", "int4_weight_only"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        excluded = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(nodes)]
        quantizer = MatMulNBitsQuantizer(
            model, bits=8 if method == "int8_weight_only" else 4, block_size=WEIGHT_ONLY_BLOCK,
            is_symmetric=True, accuracy_level=accuracy_level, nodes_to_exclude=excluded,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    elif method in ("static_qdq", "static_qdq_percentile"):
        quantize_qdq(fp32_path, out_path, calibration, nodes, "minmax" if method == "static_qdq" else "percentile")
    else:
        raise StageError(f"quantize.method: unknown method {method!r}")
    return out_path


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: Sequence[Sequence[int]], nodes: list[str],
                 calibrate: str = "minmax") -> Path:
    """Static Q/DQ: symmetric int8 per-channel weights, symmetric activations (what TensorRT expects)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from toolkit.onnx_lm import OnnxCausalLM

    if not calibration:
        raise StageError("static Q/DQ quantization needs calibration samples; the training split gave none")
    shape = OnnxCausalLM(fp32_path, providers=["CPUExecutionProvider"])
    reader = CalibrationReader(calibration, shape.num_layers, shape.num_kv_heads, shape.head_dim)
    del shape
    quantize_static(
        fp32_path, out_path, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes, per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax if calibrate == "minmax" else CalibrationMethod.Percentile,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": 99.99,
                       "MatMulConstBOnly": True},
    )
    return out_path


# --------------------------------------------------------------------------- measurements


def perplexity(model: OnnxCausalLM, examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> float:
    """exp(mean NLL) over labelled tokens; each example is (input_ids, labels with -100 elsewhere)."""
    nll = 0.0
    count = 0
    for ids, labels in examples:
        arr = np.asarray([ids], dtype=np.int64)
        logits, _ = model.forward(arr, np.ones_like(arr), np.arange(arr.shape[1])[None, :], model.empty_past(1))
        targets = np.asarray(labels[1:])
        keep = targets != -100
        if not keep.any():
            continue
        rows = logits[0, :-1][keep].astype(np.float64)
        rows -= rows.max(axis=-1, keepdims=True)
        logprobs = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
        nll -= float(logprobs[np.arange(len(rows)), targets[keep]].sum())
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
                             completions: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(argmax hits, positions): `model` fed the reference's own greedy tokens, does it pick each next one?

    Unlike free-running agreement, one near-tie flip early on does not turn the rest of the
    reply into a mismatch, so this isolates per-token accuracy.
    """
    hits = total = 0
    for prompt, completion in zip(prompts, completions, strict=True):
        if not completion:
            continue
        ids = np.asarray([list(prompt) + list(completion)], dtype=np.int64)
        logits, _ = model.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None, :], model.empty_past(1))
        predicted = logits[0, len(prompt) - 1: ids.shape[1] - 1].argmax(axis=-1)
        hits += int((predicted == np.asarray(completion)).sum())
        total += len(completion)
    return hits, total


# --------------------------------------------------------------------------- the stage


def read_conversations(path: Path) -> list[Messages]:
    """The `messages` of every record in a data-stage jsonl split."""
    if not path.is_file():
        raise StageError(f"the data stage left no split at {path}; rerun with --force --stages data")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(list(json.loads(line)["messages"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise StageError(f"{path}:{number}: not a data-stage record ({err})") from None
    return out


def calibration_ids(tokenizer: Any, conversations: Sequence[Messages], count: int) -> list[list[int]]:
    """`count` training conversations, evenly spread over the split, rendered whole (prompt and reply)."""
    from toolkit.modeling import render_prompt_ids

    if not conversations:
        return []
    step = max(1, len(conversations) // count)
    chosen = list(conversations[::step])[:count]
    return [render_prompt_ids(tokenizer, conv, add_generation_prompt=False) for conv in chosen]


def _gate_perplexity(fp32_ppl: float, int8_ppl: float, max_delta_pct: float) -> GateResult:
    delta = (int8_ppl / fp32_ppl - 1.0) * 100.0
    return GateResult(
        name="onnx_int8_perplexity_delta_pct", passed=delta <= max_delta_pct, value=round(delta, 3),
        threshold=max_delta_pct, blocking=False,
        detail=f"test-split assistant tokens: perplexity {fp32_ppl:.3f} (FP32) -> {int8_ppl:.3f} (INT8)",
    )


def evaluate_int8(
    fp32_path: Path, int8_path: Path, tokenizer: Any, scored: Sequence[tuple[Sequence[int], Sequence[int]]],
    cfg: QuantizeSection,
) -> tuple[dict[str, Any], list[GateResult]]:
    """Fidelity (golden greedy agreement, test perplexity) and speed of INT8 against FP32: metrics, gates."""
    from toolkit.modeling import pad_token_id, stop_token_ids
    from toolkit.onnx_lm import OnnxCausalLM

    threads = cfg.bench_threads or os.cpu_count() or 1
    fp32 = OnnxCausalLM(fp32_path, providers=["CPUExecutionProvider"], threads=threads)
    int8 = OnnxCausalLM(int8_path, providers=["CPUExecutionProvider"], threads=threads)
    stops, pad = stop_token_ids(tokenizer), pad_token_id(tokenizer)
    prompts = render_conversations(tokenizer, golden_conversations())
    results = onnx_agreement(fp32, int8, prompts, max_new_tokens=cfg.gate_new_tokens, stop_ids=stops, pad_id=pad)
    reference = [fp32.greedy([p], cfg.gate_new_tokens, stops, pad)[0][0] for p in prompts]
    hits, positions = teacher_forced_agreement(int8, prompts, reference)
    if scored:
        fp32_ppl, int8_ppl = perplexity(fp32, scored), perplexity(int8, scored)
        ppl_gate = _gate_perplexity(fp32_ppl, int8_ppl, cfg.max_perplexity_delta_pct)
    else:  # nothing held out: the variant cannot be shown to keep its answers, so it is not shipped
        fp32_ppl = int8_ppl = float("nan")
        ppl_gate = GateResult(name="onnx_int8_perplexity_delta_pct", passed=False, blocking=False,
                              threshold=cfg.max_perplexity_delta_pct, detail="no test or val examples to score")

    metrics: dict[str, Any] = {
        "agreement": {f"batch{r.batch_size}": r.to_metrics() for r in results},
        "teacher_forced_agreement": round(hits / positions, 6) if positions else 1.0,
        "teacher_forced_tokens": f"{hits}/{positions}",
        "fp32_perplexity": round(fp32_ppl, 4) if scored else None,
        "int8_perplexity": round(int8_ppl, 4) if scored else None,
        "perplexity_delta_pct": round((int8_ppl / fp32_ppl - 1) * 100, 3) if scored else None,
        "perplexity_examples": len(scored),
        "bench_threads": threads,
        "bench_new_tokens": cfg.bench_new_tokens,
    }
    for batch in (1, 8):
        rows = [prompts[i % len(prompts)] for i in range(batch)]
        for name, model in (("fp32", fp32), ("int8", int8)):
            tps = decode_tokens_per_s(model, rows, cfg.bench_new_tokens)
            metrics[f"{name}_batch{batch}_tokens_per_s"] = round(tps, 2)
        metrics[f"speedup_batch{batch}"] = round(
            metrics[f"int8_batch{batch}_tokens_per_s"] / metrics[f"fp32_batch{batch}_tokens_per_s"], 3)

    forced = hits / positions if positions else 1.0
    if cfg.agreement == "greedy":
        gates = parity_gates(results, min_agreement=cfg.min_greedy_agreement, max_logit_delta=None,
                             prefix="onnx_int8", blocking=False)
    else:
        gates = [GateResult(name="onnx_int8_teacher_forced_agreement", passed=forced >= cfg.min_greedy_agreement,
                            value=round(forced, 6), threshold=cfg.min_greedy_agreement, blocking=False,
                            detail=f"{hits}/{positions} FP32 greedy tokens are INT8's top-1 when fed the same prefix")]
    gates.append(ppl_gate)
    return metrics, gates


def run(ctx: StageContext) -> StageResult:
    """Quantize the FP32 graph, gate the INT8 variant (non-blocking), time it against FP32."""
    from toolkit.export.torch_to_onnx import merged_model_dir
    from toolkit.modeling import load_tokenizer
    from toolkit.training.lora import build_example

    cfg = ctx.config.quantize
    if not cfg.enabled:
        return StageResult(metrics={"int8_shipped": False}, note="quantize.enabled is false: no INT8 variant")
    fp32_path = ctx.inputs["export_onnx"].path("model")
    tokenizer = load_tokenizer(merged_model_dir(ctx.inputs["merge"]))
    data = ctx.inputs["data"]
    train = read_conversations(data.dir / data.artifacts.get("train", "train.jsonl"))
    test = read_conversations(data.dir / data.artifacts.get("test", "test.jsonl"))
    if not test and (data.dir / data.artifacts.get("val", "val.jsonl")).is_file():
        test = read_conversations(data.dir / data.artifacts.get("val", "val.jsonl"))  # tiny datasets: no test rows
    test = test[: cfg.max_eval_examples]
    calibration = calibration_ids(tokenizer, train, cfg.calibration_samples)

    started = time.perf_counter()
    int8_path = quantize_int8(fp32_path, ctx.out_dir / INT8_FILE, cfg.method, calibration, exclude=cfg.exclude_nodes)
    metrics: dict[str, Any] = {"method": cfg.method, "exclude_nodes": cfg.exclude_nodes,
                               "quantize_s": round(time.perf_counter() - started, 2),
                               "calibration_samples": len(calibration)}
    artifacts = {"int8": INT8_FILE}
    if cfg.emit_qdq:
        started = time.perf_counter()
        if not cfg.method.startswith("static_qdq"):
            quantize_int8(fp32_path, ctx.out_dir / QDQ_FILE, "static_qdq", calibration,
                          exclude=cfg.qdq_exclude_nodes)
        artifacts["qdq"] = INT8_FILE if cfg.method.startswith("static_qdq") else QDQ_FILE
        metrics["qdq_s"] = round(time.perf_counter() - started, 2)
        metrics["qdq_bytes"] = (ctx.out_dir / artifacts["qdq"]).stat().st_size

    examples = [build_example(tokenizer, conv, ctx.config.data.max_seq_len) for conv in test]
    scored = [(ex.input_ids, ex.labels) for ex in examples if ex is not None]
    measured, gates = evaluate_int8(fp32_path, int8_path, tokenizer, scored, cfg)
    shipped = all(g.passed for g in gates)
    fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
    metrics.update(int8_shipped=shipped, **measured, fp32_bytes=fp32_bytes, int8_bytes=int8_bytes,
                   size_ratio=round(int8_bytes / fp32_bytes, 3))

    agreement = ", ".join(f"batch {r['batch_size']} {r['tokens_matched']}/{r['tokens_total']}"
                          for r in measured["agreement"].values())
    ppl = measured["perplexity_delta_pct"]
    summary = (f"{cfg.method}: greedy agreement {agreement}, "
               f"perplexity {'not scored' if ppl is None else f'{ppl:+.2f}%'}, "
               f"{measured['speedup_batch1']:.2f}x/{measured['speedup_batch8']:.2f}x FP32 speed at batch 1/8, "
               f"{int8_bytes / 2**20:.0f} MiB")
    failed = ", ".join(g.name for g in gates if not g.passed)
    note = (f"INT8 shipped ({summary})" if shipped
            else f"INT8 NOT shipped: failed {failed} ({summary}); the repository leaves it out")
    return StageResult(metrics=metrics, gates=gates, artifacts=artifacts, note=note)
