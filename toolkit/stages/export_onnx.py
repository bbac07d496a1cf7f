"""Stage ``export_onnx``: the merged model as an ONNX graph with a KV cache, gated on FP32 parity.

The graph (:mod:`toolkit.export.torch_to_onnx`) has optimum's ``text-generation-with-past``
interface. The stage then decodes the golden prompts with PyTorch and with onnxruntime at batch 1
and batch 8 (left padded) and fails the build unless the greedy tokens agree
(``export.min_greedy_agreement``, 1.0 by default) and the logits stay within
``export.max_abs_logit_delta``.
"""

from __future__ import annotations

import logging
import time

from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.export.torch_to_onnx import EXPORTER, MODEL_FILE, TASK, export_onnx, graph_stats
from toolkit.quality.fidelity import onnx_parity, parity_gates

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> StageResult:
    """Export the merged model, then gate it on greedy-token and logit parity with PyTorch."""
    cfg = ctx.config.export
    model_dir = ctx.inputs["merge"].path("model")
    started = time.perf_counter()
    onnx_path = export_onnx(model_dir, ctx.out_dir, cfg.opset)
    export_s = time.perf_counter() - started
    stats = graph_stats(onnx_path)
    log.info("export_onnx: %s in %.1f s, %s MiB, %d nodes", onnx_path.name, export_s, stats["graph_mib"],
             stats["node_count"])

    started = time.perf_counter()
    results = onnx_parity(model_dir, onnx_path, max_new_tokens=cfg.gate_new_tokens)
    gate_s = time.perf_counter() - started
    gates = parity_gates(results, min_agreement=cfg.min_greedy_agreement, max_logit_delta=cfg.max_abs_logit_delta,
                         prefix="onnx_fp32")
    parity = {f"batch{r.batch_size}": r.to_metrics() for r in results}
    summary = ", ".join(
        f"batch {r.batch_size}: {r.tokens_matched}/{r.tokens_total} tokens, max|Δlogits| {r.max_abs_logit_delta:.2g}"
        for r in results
    )
    return StageResult(
        metrics={
            "exporter": EXPORTER,
            "task": TASK,
            "export_s": round(export_s, 2),
            "parity_s": round(gate_s, 2),
            "max_abs_logit_delta": max((r.max_abs_logit_delta or 0.0) for r in results),
            "parity": parity,
            **stats,
        },
        gates=gates,
        artifacts={"model": MODEL_FILE},
        note=f"{EXPORTER} opset {stats['opset']}, {stats['graph_mib']} MiB; FP32 parity {summary} "
             f"(time: export {export_s:.0f} s, parity decodes {gate_s:.0f} s)",
    )
