"""Replicas benchmark: 1, 2 and 3 Triton replicas behind one gateway against one Triton reached directly.

Each setup is a real ``toolkit serve --replicas N`` on the same repository (every port auto). A
1-replica stack stays up throughout; each N-replica stack is measured interleaved with it and with
its Triton reached directly, so the machine's drift (other jobs) hits all three alike: time to first
token at concurrency 1 (sequential requests; to the first content chunk through the gateway, to the
first token on Triton's gRPC stream directly; medians of paired differences) and generated tokens/s
at concurrency 32 (every request generates exactly ``max_tokens``: ``ignore_eos``). The gateway gets
chat messages, Triton directly the same prompt ids the gateway renders. The routing decision itself
(the choice among 3 replicas and its load accounting) is also timed alone, in process. A script, not
a test:

    .venv/bin/python -m benchmarks.replica_scaling [--onnx build/export_onnx/model.onnx] [--replicas 1 2 3]

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
from toolkit.quality.triton_client import GenerationClient

ROOT = Path(__file__).resolve().parents[1]
from tests.devrepo import write_serving_repository  # noqa: E402 - the tests' repository writer

TOKENIZER = ROOT / "tests" / "fixtures" / "smollm2_tokenizer"
EMBEDDED = ROOT / "build" / "bench-replicas"
MODEL = "bench-chat"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def embedded_onnx() -> Path:
    """The embedded SmolLM2-135M, converted and exported once (minutes the first time)."""
    onnx = EMBEDDED / "onnx" / "model.onnx"
    if not onnx.is_file():
        from toolkit.export.torch_to_onnx import export_onnx
        from toolkit.model_io.embedded_model import embedded_gguf_path, gguf_to_hf

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
        # SIGTERM: a script started in the background has SIGINT ignored, and its children with it.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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


async def gateway_ttft(client: httpx.AsyncClient, url: str) -> float:
    return (await gateway_request(client, url, 16))[0]


async def gateway_throughput(client: httpx.AsyncClient, url: str, max_tokens: int, requests: int) -> float:
    start = time.perf_counter()
    done = await asyncio.gather(*(gateway_request(client, url, max_tokens) for _ in range(requests)))
    return sum(chunks for _, chunks in done) / (time.perf_counter() - start)


def direct_ttft(client: GenerationClient, prompt_ids: list[int]) -> float:
    result = client.submit(prompt_ids, max_tokens=16, temperature=0.0, ignore_eos=True)
    client.wait([result], 120)
    return result.ttft_s or float("nan")


def direct_throughput(client: GenerationClient, prompt_ids: list[int], max_tokens: int, requests: int) -> float:
    start = time.perf_counter()
    results = [client.submit(prompt_ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
               for _ in range(requests)]
    client.wait(results, 600)
    if any(r.error for r in results):
        raise SystemExit(f"direct Triton error: {next(r.error for r in results if r.error)}")
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - start)


async def measure(base: Stack, stack: Stack, prompt_ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """The N-replica stack against the 1-replica one (`base`, the same at every N) and against one Triton
    reached directly (base's), interleaved so that the machine's drift hits all three alike.

    TTFT at c=1: triplets of sequential requests (direct, gateway over 1 replica, gateway over N), rotating.
    Throughput at c=`concurrency`: rounds of the three, in rotating order.
    """
    direct = GenerationClient(base.grpc[0], MODEL)
    requests = args.concurrency * args.waves
    limits = httpx.Limits(max_connections=2 * args.concurrency + 8)
    ttft: dict[str, list[float]] = {"direct": [], "one": [], "many": []}
    tokens_per_s: dict[str, list[float]] = {"direct": [], "one": [], "many": []}
    try:
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            direct.wait([direct.submit(prompt_ids, max_tokens=4)], 120)
            for url in (base.url, stack.url):  # warm every replica
                await asyncio.gather(*(gateway_request(client, url, 8) for _ in range(args.concurrency)))
            order = ["direct", "one", "many"]
            for run in range(args.runs):  # in rotating order: a request's tail (closing its stream) slows the next
                for what in order[run % 3:] + order[: run % 3]:
                    if what == "direct":
                        ttft[what].append(1000 * direct_ttft(direct, prompt_ids))
                    else:
                        ttft[what].append(1000 * await gateway_ttft(client, base.url if what == "one" else stack.url))
            for round_ in range(args.rounds):
                for what in order[round_ % 3:] + order[: round_ % 3]:
                    if what == "direct":
                        value = direct_throughput(direct, prompt_ids, args.max_tokens, requests)
                    else:
                        url = base.url if what == "one" else stack.url
                        value = await gateway_throughput(client, url, args.max_tokens, requests)
                    tokens_per_s[what].append(value)
    finally:
        direct.close()
    median = statistics.median
    return {
        "ttft_ms_p50": {k: round(median(v), 2) for k, v in ttft.items()},
        "ttft_ms_p50_paired": {
            "many_minus_direct": round(median([m - d for m, d in zip(ttft["many"], ttft["direct"], strict=True)]), 2),
            "many_minus_one": round(median([m - o for m, o in zip(ttft["many"], ttft["one"], strict=True)]), 2),
            "one_minus_direct": round(median([o - d for o, d in zip(ttft["one"], ttft["direct"], strict=True)]), 2),
        },
        "tokens_per_s": {k: round(median(v), 1) for k, v in tokens_per_s.items()},
        "tokens_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in tokens_per_s.items()},
        "throughput_many_over_one": round(median(tokens_per_s["many"]) / median(tokens_per_s["one"]), 3),
    }


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
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3],
                        help="Replica counts measured, each against a 1-replica stack kept up throughout.")
    parser.add_argument("--runs", type=int, default=20, help="Pairs of sequential requests for the TTFT at c=1.")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--waves", type=int, default=2, help="Requests per throughput round = waves x concurrency.")
    parser.add_argument("--rounds", type=int, default=3, help="Throughput rounds, the three setups rotating.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers started here on the way out
    onnx = args.onnx or embedded_onnx()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        repo = write_serving_repository(Path(tmp) / "repo", MODEL, onnx, context_length=2048, max_active=32,
                                        max_queue=256, max_new_tokens_limit=1024, tokenizer_dir=TOKENIZER,
                                        stop_token_ids=[2], pad_token_id=2)
        prompt_ids = load_entry(repo.path, MODEL).tokenizer.render_ids(MESSAGES)
        base = Stack(repo.path, 1, Path(tmp) / "serve-base")
        try:
            for count in args.replicas:
                before = os.getloadavg()[0]
                stack = Stack(repo.path, count, Path(tmp) / f"serve-{count}")
                try:
                    row = asyncio.run(measure(base, stack, prompt_ids, args))
                finally:
                    stack.close()
                rows.append({"replicas": count, **row,
                             "load_average": [round(before, 2), round(os.getloadavg()[0], 2)]})
                print(rows[-1], flush=True)
        finally:
            base.close()
    decision_us = asyncio.run(routing_decision_us())
    header = (f"| replicas N | TTFT p50 ms: direct / gateway 1 / gateway N | paired: N minus 1 | paired: N minus "
              f"direct | tok/s c={args.concurrency}: direct / gateway 1 / gateway N | N over 1 |")
    lines = [header, "|---:|---|---:|---:|---|---:|"]
    for r in rows:
        t, paired, tps = r["ttft_ms_p50"], r["ttft_ms_p50_paired"], r["tokens_per_s"]
        lines.append(f"| {r['replicas']} | {t['direct']} / {t['one']} / {t['many']} | {paired['many_minus_one']} | "
                     f"{paired['many_minus_direct']} | {tps['direct']} / {tps['one']} / {tps['many']} | "
                     f"{r['throughput_many_over_one']} |")
    lines.append(f"\nThe routing decision alone (choice among 3 ready replicas, its load accounted and released): "
                 f"{decision_us:.1f} µs.")
    print("\n".join(lines))
    stamp = time.strftime("%Y%m%d")
    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "onnx": str(onnx),
        "prompt_tokens": len(prompt_ids), "max_tokens": args.max_tokens, "runs": args.runs,
        "concurrency": args.concurrency, "waves": args.waves, "rounds": args.rounds, "cpus": os.cpu_count(),
        "machine": platform.platform(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": rows, "routing_decision_us": round(decision_us, 2), "table": lines,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"replicas-{stamp}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (args.out / f"replicas-{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'replicas-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
