"""The structured-output row of `make bench`: the toolkit with a realistic ``json_schema`` against itself without.

One ``toolkit serve`` of the build's repository; at each concurrency a closed-loop streaming client
(httpx, here: ``vllm bench serve`` cannot send ``response_format``) asks the same demo prompts twice:

- constrained: ``response_format`` = the schema of ``benchmarks/grammar_engines.py`` (nested object,
  enums, arrays, numbers), greedy, at most ``max_tokens``; the reply ends when the JSON is complete;
- unconstrained: the same prompts, greedy, exactly the constrained run's mean reply length
  (``ignore_eos``), so both runs generate about as many tokens per request.

Inter-token latency is the gap between a request's streamed chunks; output tok/s is the usage's
completion tokens over the level's wall time. The generation model's grammar counters
(``toolkit_grammar_mask_seconds_total``, ``..._masked_rows_total``, ``..._masked_steps_total``) give
the mask time per sequence-step and per batched step.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.grammar_engines import SCHEMA
from benchmarks.thirdparty import Server, free_port, toolkit_serve_command

TARGET_ITL_C1 = 0.10  # constrained ITL p50 at most 10 % above unconstrained at c=1
TARGET_TPUT_C16 = 0.15  # constrained output tok/s at most 15 % below unconstrained at c=16
MASK_METRICS = ("toolkit_grammar_mask_seconds_total", "toolkit_grammar_masked_rows_total",
                "toolkit_grammar_masked_steps_total")


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[int, list[float], str, str]:
    """Stream one request: completion tokens, chunk arrival times, the text, the finish reason."""
    finish = ""
    stamps: list[float] = []
    parts: list[str] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
                text = choice["delta"].get("content")
                if text:
                    stamps.append(time.perf_counter())
                    parts.append(text)
    return tokens, stamps, "".join(parts), finish


async def _level(url: str, model: str, prompts: list[str], concurrency: int, extra: dict[str, Any]) -> dict[str, Any]:
    """A closed loop of `concurrency` workers over `prompts`; ITL, throughput and the replies."""
    queue = list(enumerate(prompts))
    results: dict[int, tuple[int, list[float], str, str]] = {}

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            index, prompt = queue.pop(0)
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, "seed": 0, **extra}
            results[index] = await _one(client, url, body)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    duration = time.perf_counter() - started
    gaps = [b - a for _, stamps, _, _ in results.values() for a, b in zip(stamps, stamps[1:], strict=False)]
    tokens = [t for t, _, _, _ in results.values()]
    cut = sum(finish == "length" for _, _, _, finish in results.values())
    return {"requests": len(results), "duration_s": duration, "total_output_tokens": sum(tokens),
            "mean_output_tokens": float(np.mean(tokens)), "output_throughput": sum(tokens) / duration,
            "itl_ms": {f"p{p}": float(np.percentile(gaps, p) * 1000) for p in (50, 90, 99)} if gaps else {},
            "cut_by_max_tokens": cut,
            "replies": [results[i][2] for i in sorted(results)]}


def _scrape(metrics_url: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=10).text
    values = dict.fromkeys(MASK_METRICS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


def measure_structured(repository: Path, model: str, prompts: list[str], concurrency: tuple[int, ...],
                       counts: dict[int, int], max_tokens: int, logs: Path, rounds: int = 2) -> dict[str, Any]:
    """Serve `repository`, measure constrained and unconstrained at each level; the record the report shows.

    Each level runs `rounds` times, alternating which of the two goes first (a shared machine drifts);
    the report keeps each side's median round.
    """
    from toolkit import __version__

    port, triton = free_port(), free_port() + 100
    url = f"http://127.0.0.1:{port}"
    command = toolkit_serve_command(repository, port, triton)
    server = Server("toolkit serve (structured)", command, f"{url}/health/ready", logs / "toolkit-structured.log",
                    cwd=logs)
    schema_format = {"type": "json_schema", "json_schema": {"name": "product", "schema": SCHEMA, "strict": True}}
    record: dict[str, Any] = {"version": __version__, "command": command, "schema": SCHEMA, "levels": {},
                              "repository": str(repository), "rounds": rounds}
    record["ready_s"] = server.start(timeout_s=900)
    metrics_url = f"http://127.0.0.1:{triton + 2}/metrics"
    try:
        bound_body = {"response_format": schema_format, "max_tokens": max_tokens}
        asyncio.run(_level(url, model, prompts[:1], 1, bound_body))  # compile the schema, warm up
        for c in concurrency:
            chosen = prompts[: counts[c]]
            bound_rounds, free_rounds = [], []
            seconds = rows = steps = 0.0
            length = 0
            for index in range(rounds):
                # The first round measures the constrained side first: its mean reply length sets the other's.
                order = ("bound", "free") if index % 2 == 0 else ("free", "bound")
                for side in order:
                    if side == "bound":
                        before = _scrape(metrics_url)
                        bound_rounds.append(asyncio.run(_level(url, model, chosen, c, bound_body)))
                        after = _scrape(metrics_url)
                        s, r, n = (after[m] - before[m] for m in MASK_METRICS)
                        seconds, rows, steps = seconds + s, rows + r, steps + n
                        length = length or max(1, round(bound_rounds[0]["mean_output_tokens"]))
                    else:
                        free_rounds.append(asyncio.run(_level(url, model, chosen, c,
                                                              {"max_tokens": length, "ignore_eos": True})))
            constrained, free = _median_round(bound_rounds), _median_round(free_rounds)
            valid = sum(_valid(reply) for r in bound_rounds for reply in r["replies"])
            record["levels"][str(c)] = {
                "constrained": {k: v for k, v in constrained.items() if k != "replies"},
                "unconstrained": {k: v for k, v in free.items() if k != "replies"},
                "valid_json": f"{valid}/{sum(len(r['replies']) for r in bound_rounds)}",
                "cut_by_max_tokens": sum(r["cut_by_max_tokens"] for r in bound_rounds),
                "rounds": {"constrained": [_summary(r) for r in bound_rounds],
                           "unconstrained": [_summary(r) for r in free_rounds]},
                "mask_us_per_row": 1e6 * seconds / rows if rows else None,
                "mask_us_per_step": 1e6 * seconds / steps if steps else None,
                "example_reply": constrained["replies"][0],
            }
            level = record["levels"][str(c)]
            print(f"  structured c={c}: ITL p50 {free['itl_ms'].get('p50', 0):.1f} -> "
                  f"{constrained['itl_ms'].get('p50', 0):.1f} ms, tok/s {free['output_throughput']:.1f} -> "
                  f"{constrained['output_throughput']:.1f}, mask {level['mask_us_per_row'] or 0:.0f} us/row, "
                  f"{level['valid_json']} valid", flush=True)
    finally:
        server.stop()
    return record


def _summary(level: dict[str, Any]) -> dict[str, Any]:
    return {"itl_ms_p50": level["itl_ms"].get("p50"), "output_throughput": level["output_throughput"],
            "mean_output_tokens": level["mean_output_tokens"]}


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput (its ITL with it)."""
    ordered = sorted(rounds, key=lambda r: r["output_throughput"])
    return ordered[(len(ordered) - 1) // 2]


def _valid(reply: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(reply), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 23's speed targets, from the record (None where a level was not measured)."""
    out = []
    one, sixteen = record.get("levels", {}).get("1"), record.get("levels", {}).get("16")
    # "cost": how much worse constrained decoding is (negative: it measured better, i.e. noise).
    if one and one["unconstrained"]["itl_ms"].get("p50"):
        cost = one["constrained"]["itl_ms"]["p50"] / one["unconstrained"]["itl_ms"]["p50"] - 1
        out.append({"target": "constrained ITL p50 at c=1 at most 10 % above unconstrained", "cost": cost,
                    "met": cost <= TARGET_ITL_C1})
    if sixteen and sixteen["unconstrained"]["output_throughput"]:
        cost = 1 - sixteen["constrained"]["output_throughput"] / sixteen["unconstrained"]["output_throughput"]
        out.append({"target": "constrained output tok/s at c=16 at most 15 % below unconstrained", "cost": cost,
                    "met": cost <= TARGET_TPUT_C16})
    return out


def markdown(record: dict[str, Any]) -> list[str]:
    """The report's structured-output section."""
    if "error" in record:
        return ["", "## Structured output", "", f"failed: {record['error']}"]
    lines = ["", "## Structured output (`response_format` json_schema vs none, same prompts)", "",
             "Schema: `benchmarks/grammar_engines.py` `SCHEMA` (nested object, enums, arrays, numbers); the "
             "unconstrained run generates the constrained run's mean reply length (`ignore_eos`).", "",
             "| c | ITL p50 ms (free → constrained) | output tok/s (free → constrained) | valid JSON (cut by "
             "max_tokens) | mask µs per sequence-step | mask µs per batched step |", "|---:|---|---|---:|---:|---:|"]
    for c, level in record["levels"].items():
        free, bound = level["unconstrained"], level["constrained"]
        lines.append(f"| {c} | {free['itl_ms'].get('p50', 0):.1f} → {bound['itl_ms'].get('p50', 0):.1f} | "
                     f"{free['output_throughput']:.1f} → {bound['output_throughput']:.1f} | {level['valid_json']} "
                     f"({level.get('cut_by_max_tokens', '?')}) | "
                     f"{level['mask_us_per_row'] or 0:.0f} | {level['mask_us_per_step'] or 0:.0f} |")
    lines += ["", "| target (issue 23) | cost of constraining (negative: measured faster) | met |", "|---|---:|---|"]
    for t in targets(record):
        lines.append(f"| {t['target']} | {100 * t['cost']:+.1f} % | {'yes' if t['met'] else 'no'} |")
    return lines


def main() -> int:
    """``python -m benchmarks.bench_structured --repository DIR``: this row alone, on any toolkit repository."""
    import argparse
    import platform
    from datetime import UTC, datetime

    from bench import QUICK, demo_prompts, machine_description

    from benchmarks.thirdparty import BENCH_DIR, ForeignLoad
    from toolkit.repository.layout import generation_models

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    levels, counts = QUICK["concurrency"], QUICK["prompts"]
    prompts, source = demo_prompts(max(counts.values()))
    stamp = datetime.now(UTC)
    logs = BENCH_DIR / "runs" / f"{stamp:%Y%m%d-%H%M%S}-structured"
    logs.mkdir(parents=True, exist_ok=True)
    foreign = ForeignLoad()
    record = measure_structured(args.repository.resolve(), generation_models(args.repository)[0], prompts, levels,
                                counts, args.max_tokens, logs, args.rounds)
    machine, slug = machine_description()
    record.update(date=stamp.isoformat(timespec="seconds"), machine=machine, prompt_source=source,
                  foreign_cores=foreign.cores(), python=platform.python_version())
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"{stamp:%Y%m%d}-{slug}-structured"
    base.with_suffix(".json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    text = "\n".join([f"# Structured-output benchmark {record['date']}", "", f"Machine: {machine}; other "
                      f"processes used {record['foreign_cores']:.2f} cores meanwhile. Repository "
                      f"`{args.repository}`; prompts: {source}.", *markdown(record)]) + "\n"
    base.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":

    raise SystemExit(main())
