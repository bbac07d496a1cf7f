"""The generation model in a real Triton server on loopback, over gRPC streaming.

Greedy tokens through Triton equal the direct ONNX greedy loop at concurrency 1 and 8; 32 concurrent
streams complete and the batching shows in Triton's and the model's metrics; cancelling a stream
frees its slot; every bad input gets an error and its stream ends.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.integration.conftest import IM_END, RunningTriton, ServedRepository
from toolkit.errors import ServingError
from toolkit.quality.triton_client import GenerationClient, generation_inputs
from toolkit.runtime.onnx_lm import OnnxCausalLM
from toolkit.runtime.requests import GenerationRequest, SamplingParams
from toolkit.runtime.runners import OnnxRunner
from toolkit.runtime.scheduler import Scheduler
from toolkit.supervisor.triton_server import TritonServer

pytestmark = pytest.mark.integration
TIMEOUT_S = 60.0


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 49152, size=int(rng.integers(2, 40)))] for _ in range(count)]


def _reference(onnx: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    lm = OnnxCausalLM(onnx)
    return [lm.greedy([p], max_tokens, [IM_END])[0][0] for p in prompts]


def scrape(metrics_url: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in values.items():
        series, _, label_text = key.partition("{")
        if series != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            total += value
    return total


class RecordingStream:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.done = False

    def on_tokens(self, ids: list[int], logprobs: Any = None, prompt_logprobs: Any = None) -> None:
        self.tokens.extend(ids)

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.done = True

    def on_error(self, message: str) -> None:
        raise AssertionError(message)

    def is_cancelled(self) -> bool:
        return False


def _reference_each(onnx: Path, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    lm = OnnxCausalLM(onnx)
    return [lm.greedy([p], n, [IM_END])[0][0] for p, n in zip(prompts, max_tokens, strict=True)]


@pytest.mark.parametrize("split_kv", [True, False], ids=["split-kv graph", "exported graph"])
def test_scheduler_over_real_onnx_matches_direct_greedy(tiny_onnx: Path, split_kv: bool) -> None:
    """Rows join between steps, leave at different lengths, and (split-KV) outgrow their spare columns."""
    prompts = _prompts(6, seed=5)
    max_tokens = [12 + 9 * i for i in range(6)]  # up to 57 steps: the 32 spare columns run out
    expected = _reference_each(tiny_onnx, prompts, max_tokens)
    runner = OnnxRunner(tiny_onnx, split_kv=split_kv)
    assert (runner.kv_spare_columns > 0) == split_kv, runner.graph_note
    scheduler = Scheduler(runner, max_active=4)
    streams = [RecordingStream() for _ in prompts]
    for prompt, stream, limit in zip(prompts, streams, max_tokens, strict=True):
        scheduler.submit(GenerationRequest(prompt, limit, SamplingParams(), frozenset({IM_END})), stream)
        scheduler.step()
    while not all(s.done for s in streams):
        scheduler.step()
    assert [s.tokens for s in streams] == expected


@pytest.mark.parametrize("split_kv", [True, False], ids=["split-kv graph", "exported graph"])
def test_the_benchmarks_bare_loop_generates_what_greedy_does(tiny_onnx: Path, split_kv: bool) -> None:
    """`make bench`'s single-stream floor must be a correct loop, or its speed means nothing (it once fed the
    split graph's new-token-only present back as the whole cache: fast, and 0/24 answers right)."""

    from benchmarks.bench_systems import OnnxLoop

    loop = OnnxLoop.__new__(OnnxLoop)  # its runner without a build's tokenizer and files
    loop.runner, loop.stops = OnnxRunner(tiny_onnx, split_kv=split_kv), {IM_END}
    prompts = _prompts(3, seed=11)
    limits = [5, 40, 50]  # past the 32 spare columns
    assert [loop.generate(p, n, ignore_eos=False)[0] for p, n in zip(prompts, limits, strict=True)] == \
        _reference_each(tiny_onnx, prompts, limits)


def test_split_kv_graph_logits_equal_the_exported_graph(tiny_onnx: Path) -> None:
    """Prefill (left-padded) and a decode step over a cache with masked spare columns, against the export."""
    from toolkit.runtime.kvcache import BatchKV, left_pad

    split, plain = OnnxRunner(tiny_onnx), OnnxRunner(tiny_onnx, split_kv=False)
    ids, mask, positions = left_pad(_prompts(3, seed=9))
    split_logits, split_new = split.forward(ids, mask, positions, split.empty_past(3))
    plain_logits, plain_present = plain.forward(ids, mask, positions, plain.empty_past(3))
    assert split_logits.shape[1] == 1  # the last position only
    np.testing.assert_allclose(split_logits[:, -1], plain_logits[:, -1], atol=1e-4)
    kv = BatchKV(spare_columns=split.kv_spare_columns)
    kv.add(split_new, mask)
    tokens = plain_logits[:, -1].argmax(-1)
    step_ids, step_mask, step_pos = kv.step_inputs(tokens)
    assert step_mask.shape[1] == mask.shape[1] + split.kv_spare_columns + 1
    split_logits, _ = split.forward(step_ids, step_mask, step_pos, kv.past)
    full_mask = np.concatenate([mask, np.ones((3, 1), dtype=np.int64)], axis=1)
    plain_logits, _ = plain.forward(step_ids, full_mask, step_pos, plain_present)
    np.testing.assert_allclose(split_logits[:, -1], plain_logits[:, -1], atol=1e-4)


def test_split_kv_graph_gives_every_positions_logits_when_asked(tiny_onnx: Path) -> None:
    """Prompt logprobs (echo) need the whole prompt's logits: the serving graph's logits_from input, fed 0."""
    from toolkit.runtime.kvcache import left_pad

    split, plain = OnnxRunner(tiny_onnx), OnnxRunner(tiny_onnx, split_kv=False)
    ids, mask, positions = left_pad(_prompts(2, seed=5))
    every, _ = split.forward(ids, mask, positions, split.empty_past(2), all_logits=True)
    want, _ = plain.forward(ids, mask, positions, plain.empty_past(2))
    assert every.shape == want.shape
    np.testing.assert_allclose(every, want, atol=1e-4)
    last, _ = split.forward(ids, mask, positions, split.empty_past(2))  # and the fast path is unchanged after it
    assert last.shape[1] == 1
    np.testing.assert_allclose(last[:, -1], want[:, -1], atol=1e-4)


@pytest.mark.parametrize("concurrency", [1, 8])
def test_greedy_through_triton_equals_onnx_greedy(
    triton_server: RunningTriton, tiny_repository: ServedRepository, concurrency: int
) -> None:
    prompts = _prompts(concurrency, seed=concurrency)
    expected = _reference(tiny_repository.onnx, prompts, 16)
    with GenerationClient(triton_server.grpc_url, triton_server.model) as client:
        results = [client.submit(p, max_tokens=16) for p in prompts]
        client.wait(results, TIMEOUT_S)
    for prompt, result, want in zip(prompts, results, expected, strict=True):
        assert result.error is None, result.error
        assert result.tokens == want
        assert result.finish_reason == ("length" if len(want) == 16 else "stop")
        assert (result.prompt_tokens, result.completion_tokens) == (len(prompt), len(want))


def test_32_concurrent_streams_complete_and_batching_shows_in_metrics(triton_server: RunningTriton) -> None:
    before = scrape(triton_server.metrics_url)
    prompts = _prompts(32, seed=32)
    with GenerationClient(triton_server.grpc_url, triton_server.model) as client:
        results = [client.submit(p, max_tokens=24) for p in prompts]
        client.wait(results, TIMEOUT_S)
    assert all(r.error is None and r.finish_reason in ("stop", "length") for r in results)
    deadline = time.monotonic() + 10
    while True:  # nv_inference_* counters are published on Triton's metrics interval
        after = scrape(triton_server.metrics_url)
        labels = {"model": triton_server.model}
        requests = metric(after, "nv_inference_count", **labels) - metric(before, "nv_inference_count", **labels)
        execs = metric(after, "nv_inference_exec_count", **labels) - metric(before, "nv_inference_exec_count",
                                                                              **labels)
        if requests >= 32 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert requests == 32
    assert 0 < execs < requests, "Triton's dynamic batcher never handed the model more than one request"
    steps = metric(after, "toolkit_batch_size_count") - metric(before, "toolkit_batch_size_count")
    single = metric(after, "toolkit_batch_size_bucket", le="1") - metric(before, "toolkit_batch_size_bucket", le="1")
    assert steps > single, "no decode step ran more than one sequence"
    mean_batch = (metric(after, "toolkit_batch_size_sum") - metric(before, "toolkit_batch_size_sum")) / steps
    assert mean_batch > 1
    generated = metric(after, "toolkit_generated_tokens_total") - metric(before, "toolkit_generated_tokens_total")
    assert generated == sum(len(r.tokens) for r in results)
    assert metric(after, "toolkit_time_to_first_token_seconds_count") >= 32


def test_cancelling_a_stream_frees_its_slot(triton_server: RunningTriton) -> None:
    before = scrape(triton_server.metrics_url)
    client = GenerationClient(triton_server.grpc_url, triton_server.model)
    result = client.submit(_prompts(1, seed=99)[0], max_tokens=900)
    deadline = time.monotonic() + TIMEOUT_S
    while len(result.tokens) < 5 and not result.done.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    while metric(scrape(triton_server.metrics_url), "toolkit_active_sequences") < 1:  # the gauge may trail the tokens
        assert time.monotonic() < deadline and not result.done.is_set(), "the stream never showed as active"
        time.sleep(0.02)
    client.close(cancel=True)
    deadline = time.monotonic() + 20
    while metric(scrape(triton_server.metrics_url), "toolkit_active_sequences") > 0:
        assert time.monotonic() < deadline, "the cancelled sequence still holds its slot"
        time.sleep(0.1)
    after = scrape(triton_server.metrics_url)
    cancelled = metric(after, "toolkit_requests_total", finish_reason="cancelled") - metric(
        before, "toolkit_requests_total", finish_reason="cancelled")
    assert cancelled == 1
    assert len(result.tokens) < 900  # the client sees its own cancellation, the server stopped early


def _typed(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    item = grpcclient.InferInput(name, list(array.shape), dtype)
    item.set_data_from_numpy(array)
    return item


BAD_INPUTS = {
    "missing input_ids": ([_typed("max_tokens", np.asarray([[4]], np.int32), "INT32")], "input_ids"),
    "empty input_ids": ([_typed("input_ids", np.zeros((1, 0), np.int64), "INT64")], "empty"),
    "id outside the vocabulary": (generation_inputs([5, 49152]), "outside the vocabulary"),
    "prompt longer than the context": (generation_inputs([5] * 1024), "context is 1024"),
    "max_tokens 0": (generation_inputs([5], max_tokens=0), "must be > 0"),
    "max_tokens negative": (generation_inputs([5], max_tokens=-4), "must be > 0"),
    "max_tokens over the limit": (generation_inputs([5], max_tokens=1001), "at most 1000"),
    "input_ids as floats": ([_typed("input_ids", np.asarray([[1.0, 2.0]], np.float32), "FP32")], "data-type"),
    "temperature as int": (generation_inputs([5]) + [_typed("temperature", np.asarray([[1]], np.int32), "INT32")],
                           "data-type"),
    "unknown input": (generation_inputs([5]) + [_typed("beam_width", np.asarray([[2]], np.int32), "INT32")],
                      "beam_width"),
    "negative temperature": (generation_inputs([5], temperature=-1.0), "temperature must be >= 0"),
    "top_p zero": (generation_inputs([5], top_p=0.0), "top_p"),
    "batch of two": ([_typed("input_ids", np.asarray([[5, 6], [7, 8]], np.int64), "INT64")], "batch"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_an_error_and_the_stream_ends(triton_server: RunningTriton, case: str) -> None:
    inputs, message = BAD_INPUTS[case]
    with GenerationClient(triton_server.grpc_url, triton_server.model) as client:
        result = client.submit_inputs(inputs)
        client.wait([result], 30)  # raises TimeoutError if the stream hangs
    assert result.error is not None, f"{case}: no error, got {result.tokens} {result.finish_reason}"
    assert message.lower() in result.error.lower(), result.error
    assert result.tokens == []


def test_unknown_request_parameters_get_an_error(triton_server: RunningTriton) -> None:
    with GenerationClient(triton_server.grpc_url, triton_server.model) as client:
        result = client.submit_inputs(generation_inputs([5, 6]), parameters={"temperature": 0.5})
        client.wait([result], 30)
    assert result.error is not None and "unknown request parameter" in result.error


def test_server_still_serves_after_bad_inputs_and_seeded_sampling_repeats(triton_server: RunningTriton) -> None:
    with GenerationClient(triton_server.grpc_url, triton_server.model) as client:
        first = client.submit([5, 6, 7], max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
        second = client.submit([5, 6, 7], max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
        client.wait([first, second], TIMEOUT_S)
    assert first.error is None and first.tokens and first.tokens == second.tokens


def test_launcher_fails_fast_with_the_log_tail_on_a_broken_model(tmp_path: Path) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 0\n')
    (tmp_path / "broken" / "1" / "model.py").write_text("raise RuntimeError('model import exploded')\n")
    server = TritonServer(tmp_path, models=["broken"], http_port=18090, grpc_port=18091, metrics_port=18092)
    started = time.monotonic()
    with pytest.raises(ServingError, match="exploded|failed to load"):
        server.start(ready_timeout_s=60)
    assert time.monotonic() - started < 50
    assert not server.is_alive()
