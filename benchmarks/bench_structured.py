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
from bench_systems import Build
from grammar_engines import SCHEMA
from thirdparty import Server, free_port, toolkit_serve_command

TARGET_ITL_C1 = 0.10  # constrained ITL p50 at most 10 % above unconstrained at c=1
TARGET_TPUT_C16 = 0.15  # constrained output tok/s at most 15 % below unconstrained at c=16
MASK_METRICS = ("toolkit_grammar_mask_seconds_total", "toolkit_grammar_masked_rows_total",
                "toolkit_grammar_masked_steps_total")


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[int, list[float], str]:
    """Stream one request: completion tokens, chunk arrival times, the text."""
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
                text = choice["delta"].get("content")
                if text:
                    stamps.append(time.perf_counter())
                    parts.append(text)
    return tokens, stamps, "".join(parts)


async def _level(url: str, model: str, prompts: list[str], concurrency: int, extra: dict[str, Any]) -> dict[str, Any]:
    """A closed loop of `concurrency` workers over `prompts`; ITL, throughput and the replies."""
    queue = list(enumerate(prompts))
    results: dict[int, tuple[int, list[float], str]] = {}

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
    gaps = [b - a for _, stamps, _ in results.values() for a, b in zip(stamps, stamps[1:], strict=False)]
    tokens = [t for t, _, _ in results.values()]
    return {"requests": len(results), "duration_s": duration, "total_output_tokens": sum(tokens),
            "mean_output_tokens": float(np.mean(tokens)), "output_throughput": sum(tokens) / duration,
            "itl_ms": {f"p{p}": float(np.percentile(gaps, p) * 1000) for p in (50, 90, 99)} if gaps else {},
            "replies": [results[i][2] for i in sorted(results)]}


def _scrape(metrics_url: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=10).text
    values = dict.fromkeys(MASK_METRICS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


def measure_structured(build: Build, prompts: list[str], concurrency: tuple[int, ...], counts: dict[int, int],
                       max_tokens: int, logs: Path) -> dict[str, Any]:
    """Serve the build, measure constrained and unconstrained at each level; the record the report shows."""
    from toolkit import __version__

    port, triton = free_port(), free_port() + 100
    url = f"http://127.0.0.1:{port}"
    command = toolkit_serve_command(build.repository, port, triton)
    server = Server("toolkit serve (structured)", command, f"{url}/health/ready", logs / "toolkit-structured.log",
                    cwd=logs)
    schema_format = {"type": "json_schema", "json_schema": {"name": "product", "schema": SCHEMA, "strict": True}}
    record: dict[str, Any] = {"version": __version__, "command": command, "schema": SCHEMA, "levels": {}}
    record["ready_s"] = server.start(timeout_s=900)
    metrics_url = f"http://127.0.0.1:{triton + 2}/metrics"
    try:
        asyncio.run(_level(url, build.model_name, prompts[:1], 1, {"response_format": schema_format,
                                                                  "max_tokens": max_tokens}))  # compile, warm up
        for c in concurrency:
            chosen = prompts[: counts[c]]
            before = _scrape(metrics_url)
            constrained = asyncio.run(_level(url, build.model_name, chosen, c,
                                             {"response_format": schema_format, "max_tokens": max_tokens}))
            after = _scrape(metrics_url)
            seconds, rows, steps = (after[m] - before[m] for m in MASK_METRICS)
            length = max(1, round(constrained["mean_output_tokens"]))
            free = asyncio.run(_level(url, build.model_name, chosen, c, {"max_tokens": length, "ignore_eos": True}))
            valid = sum(_valid(reply) for reply in constrained["replies"])
            record["levels"][str(c)] = {
                "constrained": {k: v for k, v in constrained.items() if k != "replies"},
                "unconstrained": {k: v for k, v in free.items() if k != "replies"},
                "valid_json": f"{valid}/{len(constrained['replies'])}",
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
    if one and one["unconstrained"]["itl_ms"].get("p50"):
        ratio = one["constrained"]["itl_ms"]["p50"] / one["unconstrained"]["itl_ms"]["p50"] - 1
        out.append({"target": "constrained ITL p50 at c=1 ≤ 10 % above unconstrained", "overhead": ratio,
                    "met": ratio <= TARGET_ITL_C1})
    if sixteen and sixteen["unconstrained"]["output_throughput"]:
        ratio = 1 - sixteen["constrained"]["output_throughput"] / sixteen["unconstrained"]["output_throughput"]
        out.append({"target": "constrained output tok/s at c=16 ≤ 15 % below unconstrained", "overhead": ratio,
                    "met": ratio <= TARGET_TPUT_C16})
    return out


def markdown(record: dict[str, Any]) -> list[str]:
    """The report's structured-output section."""
    if "error" in record:
        return ["", "## Structured output", "", f"failed: {record['error']}"]
    lines = ["", "## Structured output (`response_format` json_schema vs none, same prompts)", "",
             "Schema: `benchmarks/grammar_engines.py` `SCHEMA` (nested object, enums, arrays, numbers); the "
             "unconstrained run generates the constrained run's mean reply length (`ignore_eos`).", "",
             "| c | ITL p50 ms (free → constrained) | output tok/s (free → constrained) | valid JSON | "
             "mask µs per sequence-step | mask µs per batched step |", "|---:|---|---|---:|---:|---:|"]
    for c, level in record["levels"].items():
        free, bound = level["unconstrained"], level["constrained"]
        lines.append(f"| {c} | {free['itl_ms'].get('p50', 0):.1f} → {bound['itl_ms'].get('p50', 0):.1f} | "
                     f"{free['output_throughput']:.1f} → {bound['output_throughput']:.1f} | {level['valid_json']} | "
                     f"{level['mask_us_per_row'] or 0:.0f} | {level['mask_us_per_step'] or 0:.0f} |")
    lines += ["", "| target (issue 23) | measured | met |", "|---|---:|---|"]
    for t in targets(record):
        lines.append(f"| {t['target']} | {100 * t['overhead']:+.1f} % | {'yes' if t['met'] else 'no'} |")
    return lines
