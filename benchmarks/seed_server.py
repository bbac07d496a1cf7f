"""The seed pattern, for comparison: FastAPI + transformers ``generate``, one request at a time.

This is how the project started (and how many teams first serve a fine-tuned model): the merged
PyTorch model in the web process, ``model.generate`` in a worker thread behind a lock, tokens
streamed as OpenAI ``chat.completion.chunk`` events as ``generate`` produces them. Requests that
arrive while one generates wait for the lock, so throughput does not grow with concurrency.

Only what the benchmark needs: ``GET /v1/models``, ``POST /v1/chat/completions`` (streamed or
not; ``max_tokens``/``max_completion_tokens``, greedy or sampled, ``ignore_eos``,
``stream_options.include_usage``).

    python -m benchmarks.seed_server --model build/merge/model --port 8090 [--name smollm2-chat]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class _IdStreamer(BaseStreamer):
    """Hands each new token id to the web thread (the prompt, passed first, is skipped)."""

    def __init__(self) -> None:
        self.ids: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.ids.put(int(token))

    def end(self) -> None:
        self.ids.put(None)


class SeedModel:
    """The merged model and its tokenizer; ``generate`` runs one request at a time."""

    def __init__(self, model_dir: Path, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.lock = threading.Lock()

    def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
               ignore_eos: bool) -> tuple[int, Iterator[int]]:
        """Prompt length and an iterator over generated ids (generation runs in a thread behind the lock)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        streamer = _IdStreamer()
        options: dict[str, Any] = {"max_new_tokens": max_tokens, "streamer": streamer,
                                   "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature)
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if ignore_eos:
            options["eos_token_id"] = None  # no stop token: exactly max_tokens

        def work() -> None:
            try:
                with self.lock, torch.inference_mode():
                    self.model.generate(ids, attention_mask=torch.ones_like(ids), **options)
            finally:
                streamer.end()

        threading.Thread(target=work, daemon=True).start()

        def tokens() -> Iterator[int]:
            while (token := streamer.ids.get()) is not None:
                yield token

        return int(ids.shape[1]), tokens()


def _text(content: str | list[dict[str, str]]) -> str:
    """A message's content: a string, or OpenAI's list of text parts (what vLLM's benchmark client sends)."""
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def create_app(seed: SeedModel, name: str) -> FastAPI:
    app = FastAPI(title="seed pattern: FastAPI + transformers generate")
    stops = {seed.tokenizer.eos_token_id}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "seed"}]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in body["messages"]]
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
        temperature = float(body.get("temperature", 1.0))
        ignore_eos = bool(body.get("ignore_eos", False))
        prompt_tokens, ids = seed.stream(messages, max_tokens, temperature, ignore_eos)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        loop = asyncio.get_running_loop()

        async def next_ids() -> AsyncIterator[int]:
            while (token := await loop.run_in_executor(None, next, ids, None)) is not None:
                if token in stops and not ignore_eos:
                    break
                yield token

        if not body.get("stream"):
            generated = [t async for t in next_ids()]
            # A character cut off by max_tokens is dropped, not sent broken (as the gateway does).
            text = str(seed.tokenizer.decode(generated, skip_special_tokens=True)).rstrip("\ufffd")
            finish = "length" if len(generated) >= max_tokens else "stop"
            return JSONResponse({
                "id": request_id, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(generated),
                          "total_tokens": prompt_tokens + len(generated)}})

        def chunk(delta: dict[str, str], finish: str | None = None) -> str:
            event = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            generated: list[int] = []
            sent = ""
            first = True
            async for token in next_ids():
                generated.append(token)
                text = str(seed.tokenizer.decode(generated, skip_special_tokens=True))
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 character: wait for its other bytes
                if first:
                    yield chunk({"role": "assistant", "content": ""})
                    first = False
                yield chunk({"content": text[len(sent):]})
                sent = text
            yield chunk({}, "length" if len(generated) >= max_tokens else "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(generated),
                         "total_tokens": prompt_tokens + len(generated)}
                event = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": name,
                         "choices": [], "usage": usage}
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="merged Hugging Face model directory")
    parser.add_argument("--name", default="smollm2-chat", help="model name in the API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    uvicorn.run(create_app(SeedModel(args.model, args.threads), args.name), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
