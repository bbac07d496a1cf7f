"""Stage ``triton_gate``: the build's last gate, the new repository served by a real Triton.

Loads the freshly written repository in a tritonserver child (explicit model control, free loopback
ports), renders the golden prompts with the model's own chat template and tokenizer from the
repository, streams them through the generation model over gRPC with greedy decoding, all at once
(so they share decode batches), and requires the served tokens to equal the ONNX greedy tokens of
the exported graph, prompt for prompt and token for token.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

from toolkit.buildsys.memory import MIB, tree_peak_rss_bytes
from toolkit.buildsys.report import GateResult, StageStatus
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.errors import StageError
from toolkit.quality.golden import golden_conversations
from toolkit.repository.manifest import TOKENIZER_DIR, ModelManifest

log = logging.getLogger(__name__)

GATE_NEW_TOKENS = 24
STREAM_TIMEOUT_S = 600.0


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel reports free right now (the server binds them a moment later)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def serve_and_compare(
    repository: Path, model: str, version: int, onnx: Path, max_new_tokens: int = GATE_NEW_TOKENS,
    log_path: Path | None = None,
) -> dict[str, object]:
    """Serve the golden prompts through Triton and through the ONNX greedy loop; return both and the score."""
    from toolkit.model_io.modeling import load_tokenizer, render_prompt_ids
    from toolkit.quality.triton_client import GenerationClient
    from toolkit.runtime.onnx_lm import OnnxCausalLM
    from toolkit.supervisor.triton_server import TritonServer

    version_dir = repository / model / str(version)
    manifest = ModelManifest.load(version_dir)
    tokenizer = load_tokenizer(version_dir / TOKENIZER_DIR)
    prompts = [render_prompt_ids(tokenizer, conversation) for conversation in golden_conversations()]
    stops = sorted(set(manifest.stop_token_ids) | set(manifest.eos_token_ids))

    lm = OnnxCausalLM(onnx)
    expected = [lm.greedy([p], max_new_tokens, stops)[0][0] for p in prompts]
    del lm

    http, grpc, metrics = free_ports(3)
    server = TritonServer(repository, models=[model], http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_path=log_path)
    started = time.perf_counter()
    with server:
        ready_s = time.perf_counter() - started
        with GenerationClient(server.grpc_url, model) as client:
            results = [client.submit(p, max_tokens=max_new_tokens, temperature=0.0) for p in prompts]
            client.wait(results, STREAM_TIMEOUT_S)
        server_peak = tree_peak_rss_bytes(server.process.pid) if server.process is not None else 0
    errors = [r.error for r in results if r.error]
    if errors:
        raise StageError(f"Triton answered a golden prompt with an error: {errors[0]}")
    served = [r.tokens for r in results]
    total = sum(len(e) for e in expected)
    agree = sum(a == b for s, e in zip(served, expected, strict=True) for a, b in zip(s, e, strict=False))
    exact = sum(s == e for s, e in zip(served, expected, strict=True))
    return {
        "prompts": len(prompts), "exact_prompts": exact, "tokens": total, "agreeing_tokens": agree,
        "token_agreement": agree / total if total else 1.0, "ready_s": round(ready_s, 2),
        "served": served, "expected": expected,
        "finish_reasons": [r.finish_reason for r in results],
        "triton_peak_rss_mib": round(server_peak / MIB),  # tritonserver and its python-backend stubs
    }


def run(ctx: StageContext) -> StageResult:
    if not ctx.config.serving.triton_gate:
        return StageResult(status=StageStatus.UNAVAILABLE, note="serving.triton_gate is off")
    record = ctx.inputs["repository"]
    repository = Path(str(record.metrics["repository"]))
    version = int(record.metrics["version"])
    model = ctx.config.model.name
    # Compare with the graph the generation model serves (onnx_int8 when repository.serving_precision picks it).
    core = ModelManifest.load(repository / model / str(version)).serving_core_model
    served = repository / core / str(version) / "model.onnx"
    onnx = served if served.is_file() else ctx.inputs["export_onnx"].path("model")
    against = f" {core}" if served.is_file() and not core.endswith("onnx_fp32") else ""
    outcome = serve_and_compare(repository, model, version, onnx, log_path=ctx.out_dir / "tritonserver.log")
    (ctx.out_dir / "triton_gate.json").write_text(json.dumps(outcome, indent=2) + "\n", encoding="utf-8")
    exact, prompts = int(outcome["exact_prompts"]), int(outcome["prompts"])  # type: ignore[call-overload]
    agreement = float(outcome["token_agreement"])  # type: ignore[arg-type]
    detail = (f"{exact}/{prompts} golden prompts identical, {outcome['agreeing_tokens']}/{outcome['tokens']} "
              f"greedy tokens agree (Triton {model} v{version} vs ONNX{against})")
    gate = GateResult(name="triton_greedy_parity", passed=exact == prompts, value=agreement, threshold=1.0,
                      detail=detail)
    metrics = {k: v for k, v in outcome.items() if k not in ("served", "expected")}
    return StageResult(metrics=metrics, gates=[gate], artifacts={"outputs": "triton_gate.json",
                                                                 "log": "tritonserver.log"}, note=detail)
