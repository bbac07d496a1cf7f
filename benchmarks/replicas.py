"""Replicas benchmark: 1, 2 and 3 Triton replicas behind one gateway against one Triton reached directly.

Each setup is a real ``toolkit serve --replicas N`` on the same repository (every port auto). Measured
per setup: time to first token at concurrency 1 (sequential requests; to the first content chunk
through the gateway, to the first token on Triton's gRPC stream directly) and generated tokens/s at
concurrency 32 (every request generates exactly ``max_tokens``: ``ignore_eos``). The gateway gets chat
messages, Triton directly the same prompt ids the gateway renders. The routing decision itself (the
choice among 3 replicas and its load accounting) is also timed alone, in process. A script, not a test:

    .venv/bin/python benchmarks/replicas.py [--onnx build/export_onnx/model.onnx] [--replicas 1 2 3]

Without ``--onnx`` (and no build), the embedded SmolLM2-135M is converted and exported once into
build/bench-replicas/. Writes benchmarks/results/replicas-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import httpx

from gateway.registry import load_entry
from toolkit.serving.client import GenerationClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from devrepo import write_serving_repository  # noqa: E402 - the tests' repository writer

TOKENIZER = ROOT / "tests" / "fixtures" / "smollm2_tokenizer"
EMBEDDED = ROOT / "build" / "bench-replicas"
MODEL = "bench-chat"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def embedded_onnx() -> Path:
    """The embedded SmolLM2-135M, converted and exported once (minutes the first time)."""
    onnx = EMBEDDED / "onnx" / "model.onnx"
    if not onnx.is_file():
        from toolkit.embedded_model import embedded_gguf_path, gguf_to_hf
        from toolkit.export.torch_to_onnx import export_onnx

        if not (EMBEDDED / "hf" / "config.json").is_file():
            gguf_to_hf(embedded_gguf_path(), EMBEDDED / "hf")
        export_onnx(EMBEDDED / "hf", EMBEDDED / "onnx")
    return onnx


class Stack:
    """``toolkit serve --replicas N`` with every port picked free, until closed."""

    def __init__(self, repository: Path, replicas: int, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "toolkit", "serve", "--repository", str(repository), "--replicas", str(replicas),
             "--log-dir", str(log_dir), "--port", "auto", "--http-port", "auto", "--grpc-port", "auto",
             "--metrics-port", "auto"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 600
        while True:
            state = self._state()
            if state is not None and state["status"] == "ready":
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"toolkit serve --replicas {replicas} did not start; see {log_dir}")
            time.sleep(0.5)
        self.url = f"http://127.0.0.1:{state['gateway_port']}"
        self.grpc = [f"127.0.0.1:{r['grpc_port']}" for r in state["replicas"]]

    def _state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads((self.log_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return state

    def close(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(120)


async def gateway_request(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, content chunks) of one streamed chat completion."""
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True,
               "ignore_eos": True}
    start, first, chunks = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                if any(c["delta"].get("content") for c in event.get("choices", [])):
                    first = first or time.perf_counter() - start
                    chunks += 1
    return first or float("nan"), chunks


async def gateway_levels(url: str, runs: int, max_tokens: int, concurrency: int, waves: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await gateway_request(client, url, 4)  # warm-up
        ttfts = [(await gateway_request(client, url, 16))[0] for _ in range(runs)]
        await asyncio.gather(*(gateway_request(client, url, 8) for _ in range(concurrency)))  # warm every replica
        start = time.perf_counter()
        done = await asyncio.gather(*(gateway_request(client, url, max_tokens) for _ in range(concurrency * waves)))
        elapsed = time.perf_counter() - start
    return {"ttft_ms_p50": round(1000 * statistics.median(ttfts), 2), "ttft_ms_p90": round(1000 * _p90(ttfts), 2),
            "c_tokens_per_s": round(sum(chunks for _, chunks in done) / elapsed, 1)}


def direct_levels(grpc_url: str, prompt_ids: list[int], runs: int, max_tokens: int, concurrency: int,
                  waves: int) -> dict[str, Any]:
    with GenerationClient(grpc_url, MODEL) as client:
        client.wait([client.submit(prompt_ids, max_tokens=4, temperature=0.0)], 120)  # warm-up
        ttfts = []
        for _ in range(runs):
            result = client.submit(prompt_ids, max_tokens=16, temperature=0.0, ignore_eos=True)
            client.wait([result], 120)
            ttfts.append(result.ttft_s or float("nan"))
        start = time.perf_counter()
        results = [client.submit(prompt_ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                   for _ in range(concurrency * waves)]
        client.wait(results, 600)
        elapsed = time.perf_counter() - start
    if any(r.error for r in results):
        raise SystemExit(f"direct Triton error: {next(r.error for r in results if r.error)}")
    return {"ttft_ms_p50": round(1000 * statistics.median(ttfts), 2), "ttft_ms_p90": round(1000 * _p90(ttfts), 2),
            "c_tokens_per_s": round(sum(len(r.tokens) for r in results) / elapsed, 1)}


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


async def routing_decision_us() -> float:
    """Microseconds the gateway spends choosing among 3 ready replicas and accounting the request's load."""
    from gateway.replicas import Lease
    from gateway.triton import TritonPool

    pool = TritonPool(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], probe_timeout_s=1, interval_s=60)
    for replica in pool.endpoints:
        replica.healthy = True
    pool.watched_models = {MODEL}
    for replica in pool.endpoints:
        replica.ready_models = {MODEL}

    def one() -> None:
        lease = Lease(pool.pick(MODEL), 64)
        lease.consumed(1)
        lease.release()

    runs = 20_000
    best = min(timeit.repeat(one, number=runs, repeat=5))
    await pool.close()
    return 1e6 * best / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = ROOT / "build" / "export_onnx" / "model.onnx"
    parser.add_argument("--onnx", type=Path, default=default if default.is_file() else None)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", type=int, default=20, help="Sequential requests for the TTFT at concurrency 1.")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--waves", type=int, default=2, help="Requests at the concurrency level = waves x it.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    onnx = args.onnx or embedded_onnx()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        repo = write_serving_repository(Path(tmp) / "repo", MODEL, onnx, context_length=2048, max_active=32,
                                        max_queue=256, max_new_tokens_limit=1024, tokenizer_dir=TOKENIZER,
                                        stop_token_ids=[2], pad_token_id=2)
        prompt_ids = load_entry(repo.path, MODEL).tokenizer.render_ids(MESSAGES)
        for count in args.replicas:
            before = os.getloadavg()[0]
            stack = Stack(repo.path, count, Path(tmp) / f"serve-{count}")
            try:
                if count == 1:
                    row = direct_levels(stack.grpc[0], prompt_ids, args.runs, args.max_tokens, args.concurrency,
                                        args.waves)
                    rows.append({"setup": "Triton direct (1 replica, gRPC)", "replicas": 1, **row,
                                 "load_average": [before, os.getloadavg()[0]]})
                    print(rows[-1], flush=True)
                row = asyncio.run(gateway_levels(stack.url, args.runs, args.max_tokens, args.concurrency, args.waves))
            finally:
                stack.close()
            rows.append({"setup": f"gateway -> {count} replica{'s' if count > 1 else ''}", "replicas": count, **row,
                         "load_average": [before, os.getloadavg()[0]]})
            print(rows[-1], flush=True)
    decision_us = asyncio.run(routing_decision_us())
    header = f"| setup | TTFT p50 ms (c=1) | TTFT p90 ms | tok/s (c={args.concurrency}) |"
    lines = [header, "|---|---|---|---|"]
    lines += [f"| {r['setup']} | {r['ttft_ms_p50']} | {r['ttft_ms_p90']} | {r['c_tokens_per_s']} |" for r in rows]
    lines.append(f"\nThe routing decision alone (choice among 3 ready replicas, its load accounted and released): "
                 f"{decision_us:.1f} µs.")
    print("\n".join(lines))
    stamp = time.strftime("%Y%m%d")
    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "onnx": str(onnx),
        "prompt_tokens": len(prompt_ids), "max_tokens": args.max_tokens, "runs": args.runs,
        "concurrency": args.concurrency, "waves": args.waves, "cpus": os.cpu_count(), "machine": platform.platform(),
        "rows": rows, "routing_decision_us": round(decision_us, 2), "table": lines,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"replicas-{stamp}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (args.out / f"replicas-{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'replicas-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
