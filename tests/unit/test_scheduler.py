"""The continuous-batching scheduler against a deterministic numpy model (no Triton, no ONNX)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests.unit.serving_fakes import FakeRunner, RecordingStream, reference_greedy
from toolkit.runtime.kvcache import BatchKV, left_pad
from toolkit.runtime.model_metrics import NullMetrics
from toolkit.runtime.requests import GenerationRequest, QueueFullError, SamplingParams
from toolkit.runtime.scheduler import Scheduler

PROMPTS = [[3, 7, 9], [5], [1, 2, 3, 4, 5, 6, 7, 8], [11, 12], [30, 31, 32, 33], [8, 8, 8, 8, 8, 8]]


def _request(prompt: list[int], max_tokens: int = 12, stops: frozenset[int] = frozenset(), **sampling: float) -> \
        GenerationRequest:
    return GenerationRequest(prompt, max_tokens, SamplingParams(**sampling), stops)  # type: ignore[arg-type]


# 0: the exported graph's interface; 3: the split-KV graph's, its buffers reallocated every 3 steps
SPARE = pytest.mark.parametrize("spare", [0, 3])


def _drain(scheduler: Scheduler, streams: list[RecordingStream], max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if all(s.done for s in streams):
            return
        scheduler.step()
    raise AssertionError("streams did not finish")


@SPARE
def test_batched_greedy_equals_single_sequence_greedy(spare: int) -> None:
    runner = FakeRunner(spare_columns=spare)
    scheduler = Scheduler(runner, max_active=8)
    streams = [RecordingStream() for _ in PROMPTS]
    for prompt, stream in zip(PROMPTS, streams, strict=True):
        scheduler.submit(_request(prompt), stream)
    _drain(scheduler, streams)
    for prompt, stream in zip(PROMPTS, streams, strict=True):
        assert stream.tokens == reference_greedy(runner, prompt, 12, set())
        assert stream.finish == ("length", len(prompt), 12)
    # one prefill for all six, then one forward per step over the whole batch
    assert scheduler.stats.prefills == 1
    assert scheduler.stats.max_batch_size == len(PROMPTS)


@SPARE
def test_requests_joining_mid_flight_decode_exactly_as_alone(spare: int) -> None:
    runner = FakeRunner(spare_columns=spare)
    scheduler = Scheduler(runner, max_active=4)
    streams = []
    for i, prompt in enumerate(PROMPTS):
        stream = RecordingStream()
        streams.append(stream)
        scheduler.submit(_request(prompt, max_tokens=5 + 3 * i), stream)
        scheduler.step()  # a new arrival between every decode step; at most 4 active at once
    _drain(scheduler, streams)
    for i, (prompt, stream) in enumerate(zip(PROMPTS, streams, strict=True)):
        assert stream.tokens == reference_greedy(runner, prompt, 5 + 3 * i, set())
    assert 1 < scheduler.stats.max_batch_size <= 4
    assert scheduler.active_count == 0 and scheduler._kv.rows == 0


def test_stop_token_ends_the_sequence_and_is_not_streamed() -> None:
    runner = FakeRunner()
    free = reference_greedy(runner, PROMPTS[0], 12, set())
    stop = free[3]
    scheduler = Scheduler(runner)
    stream = RecordingStream()
    scheduler.submit(_request(PROMPTS[0], stops=frozenset({stop})), stream)
    _drain(scheduler, [stream])
    assert stream.tokens == free[: free.index(stop)]
    assert stream.finish == ("stop", 3, len(stream.tokens))


@SPARE
def test_cancelled_stream_is_retired_and_frees_its_slot(spare: int) -> None:
    runner = FakeRunner(spare_columns=spare)
    scheduler = Scheduler(runner, max_active=2)
    cancelled = RecordingStream(cancel_after=2)
    others = [RecordingStream(), RecordingStream()]
    scheduler.submit(_request(PROMPTS[0], max_tokens=20), cancelled)
    scheduler.submit(_request(PROMPTS[1], max_tokens=20), others[0])
    scheduler.submit(_request(PROMPTS[2], max_tokens=20), others[1])  # waits for a slot
    _drain(scheduler, [cancelled, *others])
    assert cancelled.finish is not None and cancelled.finish[0] == "cancelled"
    # polled every `cancel_poll_every` steps: a few more tokens may go out before the slot is freed
    assert 2 <= len(cancelled.tokens) <= 2 + scheduler.cancel_poll_every
    assert others[0].tokens == reference_greedy(runner, PROMPTS[1], 20, set())
    assert others[1].tokens == reference_greedy(runner, PROMPTS[2], 20, set())


def test_cancelled_while_queued_never_runs() -> None:
    scheduler = Scheduler(FakeRunner())
    stream = RecordingStream()
    stream.cancel = True
    scheduler.submit(_request(PROMPTS[0]), stream)
    scheduler.step()
    assert stream.finish == ("cancelled", 3, 0) and stream.tokens == []


def test_full_queue_rejects_with_a_clear_error() -> None:
    scheduler = Scheduler(FakeRunner(), max_active=1, max_queue=2)
    for _ in range(3):  # one for the free slot, two to wait: a burst before the loop has run
        scheduler.submit(_request([1], 20), RecordingStream())
    with pytest.raises(QueueFullError, match=r"2 requests already queued \(max_queue=2\)"):
        scheduler.submit(_request([1], 20), RecordingStream())
    scheduler.step()  # the first is decoding, two wait: still full
    assert scheduler.active_count == 1 and scheduler.queue_depth == 2
    with pytest.raises(QueueFullError, match="max_queue=2"):
        scheduler.submit(_request([1], 20), RecordingStream())


def test_a_failing_forward_errors_the_streams_and_the_loop_keeps_serving() -> None:
    runner = FakeRunner()
    scheduler = Scheduler(runner)
    scheduler.start()
    try:
        first = RecordingStream()
        runner.fail_next = True
        scheduler.submit(_request(PROMPTS[0]), first)
        second = RecordingStream()
        _wait(lambda: first.done)
        scheduler.submit(_request(PROMPTS[1], max_tokens=4), second)
        _wait(lambda: second.done)
    finally:
        scheduler.stop()
    assert first.error is not None and "boom" in first.error
    assert second.tokens == reference_greedy(runner, PROMPTS[1], 4, set())


def test_stop_ends_every_open_stream() -> None:
    scheduler = Scheduler(FakeRunner())
    stream = RecordingStream()
    scheduler.submit(_request(PROMPTS[0]), stream)
    scheduler.stop()
    assert stream.error is not None and "shutting down" in stream.error


def test_background_thread_serves_concurrent_submitters() -> None:
    runner = FakeRunner()
    scheduler = Scheduler(runner, max_active=8)
    scheduler.start()
    streams = [RecordingStream() for _ in range(16)]
    try:
        threads = [threading.Thread(target=scheduler.submit, args=(_request(PROMPTS[i % 6], 6), s))
                   for i, s in enumerate(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _wait(lambda: all(s.done for s in streams))
    finally:
        scheduler.stop()
    for i, stream in enumerate(streams):
        assert stream.tokens == reference_greedy(runner, PROMPTS[i % 6], 6, set())


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch() -> None:
    runner = FakeRunner()
    outputs = []
    for companions in (0, 3):
        scheduler = Scheduler(runner)
        stream = RecordingStream()
        scheduler.submit(_request(PROMPTS[2], 10, temperature=1.0, seed=1234), stream)
        extra = [RecordingStream() for _ in range(companions)]
        for e in extra:
            scheduler.submit(_request(PROMPTS[0], 10, temperature=0.7, seed=None), e)  # type: ignore[arg-type]
        _drain(scheduler, [stream, *extra])
        outputs.append(stream.tokens)
    assert outputs[0] == outputs[1]


def test_batch_kv_trims_padding_when_the_longest_row_leaves() -> None:
    kv = BatchKV()
    ids, mask, _ = left_pad([[1] * 10, [2, 3]])
    past = [np.arange(2 * 10, dtype=np.float32).reshape(2, 1, 10, 1)]
    kv.add(past, mask)
    assert kv.width == 10
    kv.keep([1])
    assert kv.width == 2 and kv.mask.tolist() == [[1, 1]]
    assert kv.past[0][0, 0, :, 0].tolist() == [18.0, 19.0]


def test_batch_kv_with_spare_columns_writes_in_place_and_grows_only_when_full() -> None:
    kv = BatchKV(spare_columns=2)
    _, mask, _ = left_pad([[1, 1, 1], [2]])
    kv.add([np.arange(6, dtype=np.float32).reshape(2, 1, 3, 1)], mask)
    assert (kv.width, kv.capacity) == (3, 5)
    ids, step_mask, positions = kv.step_inputs(np.asarray([7, 8]))
    assert step_mask.tolist() == [[1, 1, 1, 0, 0, 1], [0, 0, 1, 0, 0, 1]]  # spare columns masked out
    assert positions.tolist() == [[3], [1]]
    buffer = kv.past[0]
    kv.advance([np.asarray([[[[10.0]]], [[[11.0]]]], dtype=np.float32)])
    assert kv.past[0] is buffer and buffer[:, 0, 3, 0].tolist() == [10.0, 11.0]  # written in place
    kv.advance([np.full((2, 1, 1, 1), 12, dtype=np.float32)])
    kv.advance([np.full((2, 1, 1, 1), 13, dtype=np.float32)])  # the spare columns ran out: a new buffer
    assert kv.past[0] is not buffer and (kv.width, kv.capacity) == (6, 7)
    assert kv.past[0][1, 0, :6, 0].tolist() == [3.0, 4.0, 5.0, 11.0, 12.0, 13.0]
    kv.keep([1])  # the long row leaves: its leading padding is trimmed, spare columns kept
    assert (kv.width, kv.capacity) == (4, 6) and kv.mask.tolist() == [[1, 1, 1, 1]]
    assert kv.past[0][0, 0, :4, 0].tolist() == [5.0, 11.0, 12.0, 13.0]
    _, late_mask, _ = left_pad([[3, 3, 3, 3, 3, 3]])
    kv.add([np.full((1, 1, 6, 1), 9, dtype=np.float32)], late_mask)  # a longer newcomer: the old row is padded
    assert kv.mask.tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6] and kv.capacity == 8
    assert kv.past[0][0, 0, :6, 0].tolist() == [0.0, 0.0, 5.0, 11.0, 12.0, 13.0]


def _wait(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the scheduler")
        time.sleep(0.005)


@SPARE
def test_prefill_is_bounded_and_chunked_by_length_without_changing_tokens(spare: int) -> None:
    runner = FakeRunner(spare_columns=spare)
    scheduler = Scheduler(runner, max_active=8, max_prefill_tokens=10)
    streams = [RecordingStream() for _ in PROMPTS]
    for prompt, stream in zip(PROMPTS, streams, strict=True):
        scheduler.submit(_request(prompt, max_tokens=6), stream)
    _drain(scheduler, streams)
    for prompt, stream in zip(PROMPTS, streams, strict=True):
        assert stream.tokens == reference_greedy(runner, prompt, 6, set())
    prefill_shapes = [(b, s) for b, s in runner.calls if s > 1]
    assert all(b * s <= 10 or b == 1 for b, s in prefill_shapes), prefill_shapes
    assert scheduler.stats.prefills > 1


class _CountingMetrics(NullMetrics):
    def __init__(self) -> None:
        self.itl = 0
        self.ttft = 0
        self.generated = 0
        self.batches: list[int] = []

    def inter_token_latency(self, seconds: float) -> None:
        self.itl += 1

    def time_to_first_token(self, seconds: float) -> None:
        self.ttft += 1

    def generated_tokens(self, n: int) -> None:
        self.generated += n

    def batch_size(self, n: int) -> None:
        self.batches.append(n)


def test_metrics_count_every_token_and_sample_inter_token_latency() -> None:
    metrics = _CountingMetrics()
    scheduler = Scheduler(FakeRunner(), max_active=16, metrics=metrics, itl_samples_per_step=4)
    streams = [RecordingStream() for _ in range(16)]
    for i, stream in enumerate(streams):
        scheduler.submit(_request(PROMPTS[i % 6], max_tokens=10), stream)
    _drain(scheduler, streams)
    assert metrics.generated == sum(len(s.tokens) for s in streams) == 160
    assert metrics.ttft == 16
    assert max(metrics.batches) == 16
    assert 0 < metrics.itl <= 4 * len(metrics.batches)  # at most 4 samples per decode step
