"""Serving benchmark: Triton's continuous-batching generation model against the direct onnxruntime loop.

Tokens/s, time to first token and inter-token latency at concurrency 1, 8 and 32 through a real
tritonserver (tritonclient gRPC streaming, greedy, fixed prompts and max_tokens, no stop tokens so
every request generates exactly max_tokens), and the same model's direct onnxruntime greedy loop at
batch 1. Prints a table and writes JSON and a PNG into benchmarks/results/. A script, not a test:

    .venv/bin/python -m benchmarks.triton_direct [--onnx build/export_onnx/model.onnx] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.quality.golden import golden_conversations
from toolkit.quality.triton_client import GenerationClient, StreamResult
from toolkit.runtime.onnx_lm import OnnxCausalLM
from toolkit.supervisor.triton_server import TritonServer

ROOT = Path(__file__).resolve().parents[1]
from tests.devrepo import write_serving_repository  # noqa: E402 - the tests' repository writer, beside the fixtures

DEFAULT_ONNX = [ROOT / "build" / "export_onnx" / "model.onnx", Path("/work/dev/smollm2-base-onnx/model.onnx")]
TOKENIZER = ROOT / "tests" / "fixtures" / "smollm2_tokenizer"
MODEL = "bench-chat"
PORTS = (18020, 18021, 18022)


def fixed_prompts(tokenizer_dir: Path) -> list[list[int]]:
    """The golden conversations rendered with the model's chat template (short, Chinese, emoji, long)."""
    from toolkit.model_io.modeling import load_tokenizer, render_prompt_ids

    tokenizer = load_tokenizer(tokenizer_dir)
    return [render_prompt_ids(tokenizer, conversation) for conversation in golden_conversations()]


def direct_request(lm: OnnxCausalLM, prompt: list[int], max_tokens: int) -> tuple[float, float, list[float]]:
    """One request through OnnxCausalLM's batch-1 greedy loop (same math as ``OnnxCausalLM.greedy``), timed
    per token: (elapsed s, time to first token s, inter-token gaps s)."""
    started = time.perf_counter()
    ids = np.asarray([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.arange(len(prompt), dtype=np.int64)[None]
    past = lm.empty_past(1)
    stamps = []
    for _ in range(max_tokens):
        logits, past = lm.forward(ids, mask, positions, past)
        token = int(logits[0, -1].argmax())
        stamps.append(time.perf_counter())
        ids = np.asarray([[token]], dtype=np.int64)
        positions = positions[:, -1:] + 1
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return stamps[-1] - started, stamps[0] - started, gaps


def paired_single_stream(
    lm: OnnxCausalLM, client: GenerationClient, prompts: list[list[int]], max_tokens: int
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Alternate direct and Triton requests on the same prompts, so load drift on a shared machine hits both.

    Returns the direct row, the Triton row and the median per-pair Triton/direct speed ratio.
    """
    direct: dict[str, list[float]] = {"elapsed": [], "ttft": [], "itl": []}
    served: dict[str, list[float]] = {"elapsed": [], "ttft": [], "itl": []}
    ratios = []
    for prompt in prompts:
        elapsed, ttft, gaps = direct_request(lm, prompt, max_tokens)
        direct["elapsed"].append(elapsed)
        direct["ttft"].append(ttft)
        direct["itl"] += gaps
        result = client.submit(prompt, max_tokens=max_tokens)
        client.wait([result], 600)
        if result.error or len(result.tokens) != max_tokens:
            raise SystemExit(f"Triton request failed: {result.error or len(result.tokens)}")
        served["elapsed"].append(result.token_times[-1] - result.sent_at)
        served["ttft"].append(float(result.ttft_s or 0.0))
        served["itl"] += result.inter_token_s()
        ratios.append(elapsed / served["elapsed"][-1])
    tokens = max_tokens * len(prompts)
    return (
        _row("direct onnxruntime (batch 1)", 1, tokens, sum(direct["elapsed"]), direct["ttft"], direct["itl"]),
        _row("Triton, concurrency 1", 1, tokens, sum(served["elapsed"]), served["ttft"], served["itl"]),
        statistics.median(ratios),
    )


class _TimedStream:
    def __init__(self) -> None:
        self.sent_at = time.perf_counter()
        self.times: list[float] = []
        self.done = False

    def on_tokens(self, ids: list[int], logprobs: Any = None, prompt_logprobs: Any = None) -> None:
        self.times.extend([time.perf_counter()] * len(ids))

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.done = True

    def on_error(self, message: str) -> None:
        raise SystemExit(f"in-process scheduler failed: {message}")

    def is_cancelled(self) -> bool:
        return False


def scheduler_in_process(onnx: Path, prompts: list[list[int]], concurrency: int, max_tokens: int) -> \
        dict[str, Any]:
    """The same continuous-batching scheduler without Triton: separates batching from serving overhead."""
    from toolkit.runtime.requests import GenerationRequest, SamplingParams
    from toolkit.runtime.runners import OnnxRunner
    from toolkit.runtime.scheduler import Scheduler

    scheduler = Scheduler(OnnxRunner(onnx), max_active=32)
    streams = []
    started = time.perf_counter()
    for i in range(concurrency):
        stream = _TimedStream()
        scheduler.submit(GenerationRequest(prompts[i % len(prompts)], max_tokens, SamplingParams()), stream)
        streams.append(stream)
    while not all(s.done for s in streams):
        scheduler.step()
    elapsed = time.perf_counter() - started
    ttfts = [s.times[0] - s.sent_at for s in streams]
    itls = [b - a for s in streams for a, b in zip(s.times, s.times[1:], strict=False)]
    return _row(f"in-process scheduler, c {concurrency}", concurrency, sum(len(s.times) for s in streams), elapsed,
                ttfts, itls)


def _row(name: str, concurrency: int, tokens: int, elapsed: float, ttfts: list[float], itls: list[float]) -> \
        dict[str, Any]:
    return {
        "name": name, "concurrency": concurrency, "tokens": tokens, "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1),
        "ttft_ms_mean": round(1000 * statistics.mean(ttfts), 1),
        "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1),
        "itl_ms_mean": round(1000 * statistics.mean(itls), 2) if itls else 0.0,
        "itl_ms_p50": round(1000 * statistics.median(itls), 2) if itls else 0.0,
        "itl_ms_p95": round(1000 * float(np.percentile(itls, 95)), 2) if itls else 0.0,
    }


def triton_level(client: GenerationClient, prompts: list[list[int]], concurrency: int, max_tokens: int,
                 requests: int) -> dict[str, Any]:
    """``requests`` streams, at most ``concurrency`` in flight (a new one starts as soon as one finishes)."""
    results: list[StreamResult] = []
    queue = [prompts[i % len(prompts)] for i in range(requests)]
    started = time.perf_counter()
    in_flight: list[StreamResult] = []
    while queue or in_flight:
        while queue and len(in_flight) < concurrency:
            result = client.submit(queue.pop(0), max_tokens=max_tokens)
            in_flight.append(result)
            results.append(result)
        in_flight[0].done.wait(600)
        in_flight = [r for r in in_flight if not r.done.is_set()]
    elapsed = time.perf_counter() - started
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"a stream failed: {errors[0]}")
    tokens = sum(len(r.tokens) for r in results)
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    itls = [gap for r in results for gap in r.inter_token_s()]
    return _row(f"Triton, concurrency {concurrency}", concurrency, tokens, elapsed, ttfts, itls)


def batch_metrics(metrics_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    values: dict[str, Any] = {}
    for line in text.splitlines():
        for name in ("toolkit_batch_size_sum", "toolkit_batch_size_count", "nv_inference_count",
                     "nv_inference_exec_count"):
            if line.startswith(name + "{") and MODEL in line:
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    direct = rows[0]
    served = [r for r in rows[1:] if str(r["name"]).startswith("Triton")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [str(int(r["concurrency"])) for r in served]
    ax1.bar(labels, [r["tokens_per_s"] for r in served], color="#4c72b0", label="Triton (continuous batching)")
    ax1.axhline(direct["tokens_per_s"], color="#dd8452", linestyle="--", label="direct onnxruntime, batch 1")
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("aggregate tokens/s")
    ax1.legend(fontsize=8)
    ax2.plot(labels, [r["ttft_ms_p50"] for r in served], marker="o", label="time to first token p50 (ms)")
    ax2.plot(labels, [r["itl_ms_p50"] for r in served], marker="s", label="inter-token latency p50 (ms)")
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent streams")
    ax2.legend(fontsize=8)
    fig.suptitle("Generation through Triton vs the direct onnxruntime loop")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, default=next((p for p in DEFAULT_ONNX if p.is_file()), None))
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--single-requests", type=int, default=4,
                        help="Requests at concurrency 1, each paired with the same request on the direct loop.")
    parser.add_argument("--waves", type=int, default=1, help="Requests per level = waves x concurrency (>1).")
    parser.add_argument("--in-process", action="store_true", help="Also time the scheduler without Triton.")
    parser.add_argument("--include-long", action="store_true",
                        help="Add the 500-token golden prompt: every decode row then pads to its length.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.onnx is None or not args.onnx.is_file():
        parser.error("no ONNX export found; pass --onnx (run `toolkit build --until export_onnx` first)")
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1 (the baseline paired with the direct loop)")

    prompts = fixed_prompts(args.tokenizer)
    if not args.include_long:
        prompts = [p for p in prompts if len(p) < 256]
    single = prompts[: args.single_requests]
    print(f"model {args.onnx}; prompt lengths {[len(p) for p in prompts]}; max_tokens {args.max_tokens}; "
          f"{os.cpu_count()} CPUs", flush=True)
    lm = OnnxCausalLM(args.onnx)
    lm.greedy([prompts[0]], 4, [])  # warm-up
    in_process = [scheduler_in_process(args.onnx, prompts, level, args.max_tokens)
                  for level in args.concurrency if level > 1 and args.in_process]
    for row in in_process:
        print(row, flush=True)

    rows: list[dict[str, Any]] = []
    ratio = None
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-repo-") as tmp:
        repo = write_serving_repository(Path(tmp), MODEL, args.onnx, context_length=2048, max_active=32,
                                        max_queue=256, max_new_tokens_limit=1024, stop_token_ids=[])
        server = TritonServer(repo.path, models=[MODEL], http_port=PORTS[0], grpc_port=PORTS[1],
                              metrics_port=PORTS[2], log_path=ROOT / "build" / "bench" / "tritonserver.log")
        with server:
            with GenerationClient(server.grpc_url, MODEL) as client:
                client.wait([client.submit(prompts[0], max_tokens=4)], 120)  # warm-up
                for level in args.concurrency:
                    before = batch_metrics(server.metrics_url)
                    if level == 1:
                        direct_row, row, ratio = paired_single_stream(lm, client, single, args.max_tokens)
                        rows.insert(0, direct_row)
                        print(direct_row, flush=True)
                    else:
                        row = triton_level(client, prompts, level, args.max_tokens, level * args.waves)
                    after = batch_metrics(server.metrics_url)
                    steps = after.get("toolkit_batch_size_count", 0) - before.get("toolkit_batch_size_count", 0)
                    summed = after.get("toolkit_batch_size_sum", 0) - before.get("toolkit_batch_size_sum", 0)
                    row["mean_decode_batch"] = round(summed / steps, 2) if steps else 0.0
                    rows.append(row)
                    print(row, flush=True)

    rows += in_process
    direct_tps = rows[0]["tokens_per_s"]
    by_level = {int(r["concurrency"]): r for r in rows[1:] if str(r["name"]).startswith("Triton")}
    summary = {
        "triton_c1_overhead_pct": round(100 * (1 - by_level[1]["tokens_per_s"] / direct_tps), 1)
        if 1 in by_level else None,
        "triton_c1_overhead_pct_median_pair": round(100 * (1 - ratio), 1) if ratio is not None else None,
        "c32_over_c1": round(by_level[32]["tokens_per_s"] / by_level[1]["tokens_per_s"], 2)
        if 1 in by_level and 32 in by_level else None,
        "c32_over_direct": round(by_level[32]["tokens_per_s"] / direct_tps, 2) if 32 in by_level else None,
    }
    header = (f"{'run':32} {'tok/s':>8} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'ITL p95 ms':>11} "
              f"{'mean batch':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['name']:32} {r['tokens_per_s']:>8} {r['ttft_ms_p50']:>12} {r['itl_ms_p50']:>11} "
                     f"{r['itl_ms_p95']:>11} {r.get('mean_decode_batch', '-'):>10}")
    print("\n".join(lines))
    print(summary)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "onnx": str(args.onnx), "max_tokens": args.max_tokens, "prompt_lengths": [len(p) for p in prompts],
        "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "machine": platform.platform(),
        "rows": rows, "summary": summary, "table": lines,
    }
    (args.out / f"serving-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "serving-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out / "serving-latest.png")
    print(f"wrote {args.out / 'serving-latest.json'} and {args.out / 'serving-latest.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
