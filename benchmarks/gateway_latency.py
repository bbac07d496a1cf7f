"""Gateway overhead: time to first token and total latency through the gateway vs straight to Triton.

Against a running stack (``toolkit serve``), sequential requests (concurrency 1), greedy:

    python -m benchmarks.gateway_latency --gateway http://127.0.0.1:8080 --triton 127.0.0.1:8001 \
        --repository model_repository [--model NAME] [--api-key KEY] [--runs 10] [--max-tokens 16]

Direct Triton gets the same prompt ids the gateway renders; both runs use the same max_tokens.
The gateway's time to first token is to the first chunk with text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import openai

from gateway.registry import chat_model_names, load_entry
from toolkit.quality.triton_client import GenerationClient

PROMPT: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


def _direct(triton: str, model: str, prompt_ids: list[int], max_tokens: int) -> tuple[float, float, int]:
    with GenerationClient(triton, model) as client:
        start = time.perf_counter()
        result = client.submit(prompt_ids, max_tokens=max_tokens, temperature=0.0)
        client.wait([result], 120)
        if result.error:
            raise SystemExit(f"Triton error: {result.error}")
        return (result.ttft_s or 0.0), time.perf_counter() - start, len(result.tokens)


def _gateway(client: openai.OpenAI, model: str, max_tokens: int) -> tuple[float, float, str]:
    start = time.perf_counter()
    first = None
    parts = []
    stream = client.chat.completions.create(
        model=model,
        messages=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
    return first or 0.0, time.perf_counter() - start, "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    parser.add_argument("--triton", default="127.0.0.1:8001")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    model = args.model or chat_model_names(args.repository)[0]
    entry = load_entry(args.repository, model)
    prompt_ids = entry.tokenizer.render_ids(PROMPT)
    client = openai.OpenAI(base_url=f"{args.gateway}/v1", api_key=args.api_key, max_retries=0)
    _direct(args.triton, model, prompt_ids, args.max_tokens)  # warm-up
    _gateway(client, model, args.max_tokens)
    direct = [_direct(args.triton, model, prompt_ids, args.max_tokens) for _ in range(args.runs)]
    through = [_gateway(client, model, args.max_tokens) for _ in range(args.runs)]
    result = {
        "model": model,
        "prompt_tokens": len(prompt_ids),
        "max_tokens": args.max_tokens,
        "runs": args.runs,
        "direct_ttft_ms": round(1000 * statistics.median(d[0] for d in direct), 1),
        "gateway_ttft_ms": round(1000 * statistics.median(g[0] for g in through), 1),
        "direct_total_ms": round(1000 * statistics.median(d[1] for d in direct), 1),
        "gateway_total_ms": round(1000 * statistics.median(g[1] for g in through), 1),
        "completion_tokens": direct[0][2],
        "gateway_text": through[0][2],
    }
    print(json.dumps(result, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
