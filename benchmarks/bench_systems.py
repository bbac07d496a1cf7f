"""The systems `bench.py` measures: how each is set up, started, asked for greedy answers and stopped.

Every server system is an OpenAI-compatible HTTP server that the third-party client
(``vllm bench serve --backend openai-chat``) drives; the bare onnxruntime loop has no server and is
timed in-process with the toolkit's own runner (``toolkit.runtime.runners.OnnxRunner``).
``toolkit-int8`` is the toolkit serving the build's INT8 graph from a repository written beside the
run (:func:`int8_repository`): the same server, batching and prompts, only the precision differs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.thirdparty import (
    Server,
    ensure_gguf,
    ensure_llama_server,
    ensure_vllm,
    free_port,
    toolkit_serve_command,
    vllm_env,
)

SERVERS = ("toolkit", "toolkit-int8", "vllm", "llama.cpp", "seed")
SYSTEMS = (*SERVERS, "onnxruntime", "structured")
LABELS = {
    "toolkit": "toolkit (Triton + gateway)",
    "toolkit-int8": "toolkit INT8 (Triton + gateway, onnx_int8)",
    "vllm": "vLLM CPU",
    "llama.cpp": "llama.cpp llama-server",
    "seed": "seed (FastAPI + transformers, 1 at a time)",
    "onnxruntime": "bare onnxruntime loop (no server)",
    "structured": "toolkit with response_format json_schema vs without",
}


@dataclass
class Build:
    """What is measured: the merged model (vLLM, llama.cpp, seed) and the repository (toolkit, onnxruntime)."""

    workspace: Path
    repository: Path
    merged: Path
    model_name: str
    onnx: Path
    tokenizer: Path
    stop_ids: list[int]
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def find(cls, workspace: Path, repository: Path) -> Build:
        from toolkit.repository.layout import generation_models, latest_version_dir

        merged = workspace / "merge" / "model"
        if not (merged / "config.json").is_file():
            raise SystemExit(f"no merged model in {merged}: run `make build` first (or pass --workspace)")
        name = generation_models(repository)[0]
        version_dir = latest_version_dir(repository / name)
        manifest = json.loads((version_dir / "manifest.json").read_text())
        core = repository / manifest["serving_core_model"]
        onnx = core / version_dir.name / "model.onnx"
        if not onnx.is_file():
            onnx = latest_version_dir(core) / "model.onnx"
        stops = sorted(set(manifest.get("stop_token_ids", [])) | set(manifest.get("eos_token_ids", [])))
        return cls(workspace, repository, merged, name, onnx, version_dir / "tokenizer", stops, manifest)


@dataclass
class System:
    """A server system: how to start it, the URL the client uses, the version it reports."""

    name: str
    server: Server
    url: str
    version: str
    notes: str = ""

    @property
    def command(self) -> list[str]:
        return self.server.command


def _python_version_of(python: Path, module: str) -> str:
    out = subprocess.run([str(python), "-c", f"import {module}; print({module}.__version__)"], capture_output=True,
                         text=True, env=vllm_env())
    return out.stdout.strip() or "unknown"


def make_system(name: str, build: Build, max_concurrency: int, threads: int, logs: Path) -> System:
    """Set up (install or build once, cached under .bench/) and describe one server system."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if name == "toolkit":
        from toolkit import __version__

        command = toolkit_serve_command(build.repository, port, free_port() + 100)
        # Started outside the checkout, so `python -m` imports the toolkit its interpreter has installed.
        server = Server("toolkit serve", command, f"{url}/health/ready", logs / "toolkit-serve.log", cwd=logs)
        return System(name, server, url, __version__,
                      f"repository `{build.repository}` ({build.manifest.get('serving_core_model')})")
    if name == "toolkit-int8":
        from toolkit import __version__

        repository, notes = int8_repository(build, logs)
        command = toolkit_serve_command(repository, port, free_port() + 100)
        server = Server("toolkit serve (INT8)", command, f"{url}/health/ready", logs / "toolkit-int8-serve.log",
                        cwd=logs)
        return System(name, server, url, __version__, notes)
    if name == "vllm":
        vllm = ensure_vllm()
        command = [str(vllm), "serve", str(build.merged.resolve()), "--dtype", "float32", "--host", "127.0.0.1",
                   "--port", str(port), "--served-model-name", build.model_name, "--max-model-len", "2048",
                   "--seed", "0", "--max-num-seqs", str(max(max_concurrency, 1))]
        server = Server("vLLM", command, f"{url}/v1/models", logs / "vllm.log", env=vllm_env())
        return System(name, server, url, _python_version_of(vllm.parent / "python", "vllm"),
                      f"`{build.merged}`, float32")
    if name == "llama.cpp":
        binary = ensure_llama_server()
        gguf = ensure_gguf(build.merged, ensure_vllm().parent / "python")
        slots = max(max_concurrency, 1)
        # -c is the KV cache of all slots together: 512 tokens a slot covers prompt + 128 generated.
        command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
                   "-c", str(512 * slots), "-t", str(threads), "-tb", str(threads), "--alias", build.model_name,
                   "--no-webui", "--jinja", "--seed", "0"]
        server = Server("llama-server", command, f"{url}/health", logs / "llama-server.log")
        return System(name, server, url, binary.parent.parent.parent.name.removeprefix("llama.cpp-"),
                      f"F32 GGUF `{gguf.name}`, {slots} slots, {threads} threads")
    if name == "seed":
        command = [sys.executable, str(Path(__file__).with_name("seed_server.py")), "--model", str(build.merged),
                   "--name", build.model_name, "--port", str(port)]
        server = Server("seed server", command, f"{url}/health", logs / "seed-server.log")
        import transformers

        return System(name, server, url, f"transformers {transformers.__version__}",
                      f"`{build.merged}`, float32, one request at a time")
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")


def int8_repository(build: Build, logs: Path) -> tuple[Path, str]:
    """A repository beside the run whose generation model serves the build's INT8 graph (``serving_precision: int8``).

    The INT8 graph is the repository's ``NAME_onnx_int8`` (shipped: it passed the quantize stage's gate);
    a build whose INT8 failed its gate has none there, and the workspace's ``quantize/model_int8.onnx`` is
    measured instead, marked as not shipped. Batching and serving settings are the build's own
    (``report.json``), so only the precision differs from the ``toolkit`` system.
    """
    from toolkit.buildsys.config import RepositorySection, ServingSection
    from toolkit.repository.layout import core_model_name, latest_version_dir
    from toolkit.repository.writer import write_repository
    from toolkit.stages.model_repository import repository_spec

    shipped = build.repository / core_model_name(build.model_name, "onnx_int8")
    if shipped.is_dir():
        int8, status = latest_version_dir(shipped) / "model.onnx", "shipped: passed the quantize gate"
    else:
        int8 = build.workspace / "quantize" / "model_int8.onnx"
        status = "NOT shipped: failed the quantize gate, measured for comparison only"
        if not int8.is_file():
            raise SystemExit(f"no INT8 graph: {shipped} is absent and so is {int8} (quantize.enabled false?)")
    fp32 = latest_version_dir(build.repository / core_model_name(build.model_name, "onnx_fp32")) / "model.onnx"
    report = build.workspace / "report.json"
    config = json.loads(report.read_text()).get("config", {}) if report.is_file() else {}
    output = logs / "repository-int8"
    repo = RepositorySection.model_validate({**config.get("repository", {}), "output": output,
                                             "serving_precision": "int8"})
    written = write_repository(
        output, model_name=build.model_name, merged_dir=build.merged, onnx_fp32=fp32, onnx_int8=int8,
        spec=repository_spec(repo, ServingSection.model_validate(config.get("serving", {})),
                             context_length=int(build.manifest.get("context_length", 2048))),
        base_model=str(build.manifest.get("base_model")), symlink_onnx=True,
    )
    return output, f"repository `{output}` ({written.manifest.serving_core_model}, `{int8}`, {status})"


def server_answers(url: str, model: str, questions: Sequence[str], max_tokens: int) -> list[str]:
    """Greedy answers (no ignore_eos: the reply ends at the end-of-turn token) through the chat API."""
    answers = []
    with httpx.Client(timeout=300) as client:
        for question in questions:
            body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
                    "max_tokens": max_tokens, "seed": 0}
            response = client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            answers.append(str(response.json()["choices"][0]["message"]["content"]).strip())
    return answers


# -- the bare onnxruntime loop -------------------------------------------------------------------------

def _percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values) * scale
    return {f"p{p}": float(np.percentile(array, p)) for p in (50, 90, 99)} | {"mean": float(array.mean())}


class OnnxLoop:
    """Greedy batch-1 decoding with the toolkit's OnnxRunner: the floor any server on this model can reach."""

    def __init__(self, build: Build):
        from toolkit.model_io.modeling import load_tokenizer
        from toolkit.runtime.runners import OnnxRunner

        self.runner = OnnxRunner(build.onnx)
        self.tokenizer = load_tokenizer(build.tokenizer)
        self.stops = set(build.stop_ids)

    def prompt_ids(self, question: str) -> list[int]:
        from toolkit.model_io.modeling import render_prompt_ids

        return render_prompt_ids(self.tokenizer, [{"role": "user", "content": question}])

    def generate(self, prompt: list[int], max_tokens: int, ignore_eos: bool) -> tuple[list[int], list[float]]:
        """Generated ids and the time each arrived (perf_counter), starting from the call.

        The scheduler's own cache handling at batch 1 (:class:`~toolkit.runtime.kvcache.BatchKV`): the
        runner may serve the split-KV graph, whose ``present`` is the new token's keys and values only,
        so feeding ``present`` back as the next ``past`` (as a loop over the exported graph would) drops
        the whole context.
        """
        from toolkit.runtime.kvcache import BatchKV, left_pad

        stamps = [time.perf_counter()]
        ids, mask, positions = left_pad([prompt])
        logits, present = self.runner.forward(ids, mask, positions, self.runner.empty_past(1))
        kv = BatchKV(spare_columns=self.runner.kv_spare_columns)
        kv.add(present, mask)
        out: list[int] = []
        while True:
            token = int(logits[0, -1].argmax())
            if token in self.stops and not ignore_eos:
                break
            out.append(token)
            stamps.append(time.perf_counter())
            if len(out) >= max_tokens:
                break
            ids, mask, positions = kv.step_inputs(np.asarray([token]))
            logits, present = self.runner.forward(ids, mask, positions, kv.past)
            kv.advance(present)
        return out, stamps

    def answers(self, questions: Sequence[str], max_tokens: int) -> list[str]:
        # A character cut off by max_tokens is dropped, not kept broken (as the gateway does).
        return [str(self.tokenizer.decode(self.generate(self.prompt_ids(q), max_tokens, False)[0],
                                          skip_special_tokens=True)).rstrip("\ufffd").strip() for q in questions]

    def measure(self, questions: Sequence[str], max_tokens: int) -> dict[str, Any]:
        """One stream, prompts one after another, exactly max_tokens each: the metrics of a c=1 client run."""
        ttft, itl, e2e = [], [], []
        tokens = 0
        started = time.perf_counter()
        for question in questions:
            out, stamps = self.generate(self.prompt_ids(question), max_tokens, True)
            ttft.append(stamps[1] - stamps[0])
            itl += list(np.diff(stamps[1:]))
            e2e.append(stamps[-1] - stamps[0])
            tokens += len(out)
        duration = time.perf_counter() - started
        return {"completed": len(questions), "failed": 0, "duration_s": duration, "total_output_tokens": tokens,
                "output_throughput": tokens / duration, "request_throughput": len(questions) / duration,
                "ttft_ms": _percentiles(ttft), "itl_ms": _percentiles(itl), "e2el_ms": _percentiles(e2e),
                "errors": []}
