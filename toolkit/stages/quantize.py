"""Stage ``quantize``: an INT8 ONNX variant of the FP32 graph, gated on fidelity and timed against FP32.

Calibration samples are training conversations rendered with the model's chat template; the methods
and their measured fidelity are in :mod:`toolkit.export.quantization`.

The gate is not blocking: a variant that fails it is reported with ``int8_shipped: False`` and the
repository stage leaves it out. The stage also writes ``model_qdq.onnx`` (static Q/DQ, symmetric,
MinMax-calibrated on the same samples, ``quantize.qdq_exclude_nodes`` left FP32): TensorRT
builds its INT8 plan from explicit Q/DQ.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolkit.config import QuantizeSection
from toolkit.errors import StageError
from toolkit.export.quantization import (
    INT8_FILE,
    QDQ_FILE,
    decode_tokens_per_s,
    perplexity,
    quantize_int8,
    teacher_forced_agreement,
)
from toolkit.gates import onnx_agreement, parity_gates, render_conversations
from toolkit.golden import Messages, golden_conversations
from toolkit.report import GateResult
from toolkit.stage import StageContext, StageResult


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
    from toolkit.modeling import load_tokenizer
    from toolkit.training.examples import build_example

    cfg = ctx.config.quantize
    if not cfg.enabled:
        return StageResult(metrics={"int8_shipped": False}, note="quantize.enabled is false: no INT8 variant")
    fp32_path = ctx.inputs["export_onnx"].path("model")
    tokenizer = load_tokenizer(ctx.inputs["merge"].path("model"))
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
