"""The generation model's own metrics: a small interface the scheduler reports to.

``NullMetrics`` for tests and the direct loop; ``TritonMetrics`` registers ``pb_utils.MetricFamily``
counters, gauges and histograms (Triton 2.51's python backend has HISTOGRAM), which Triton then
shows on its metrics port beside the ``nv_inference_*`` metrics.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

PROMPT_TOKENS = "toolkit_prompt_tokens_total"
GENERATED_TOKENS = "toolkit_generated_tokens_total"
TIME_TO_FIRST_TOKEN = "toolkit_time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "toolkit_inter_token_latency_seconds"
BATCH_SIZE = "toolkit_batch_size"  # histogram of sequences per decode forward
LAST_BATCH_SIZE = "toolkit_last_batch_size"
ACTIVE_SEQUENCES = "toolkit_active_sequences"
QUEUE_DEPTH = "toolkit_queue_depth"
KV_CACHE_BYTES = "toolkit_kv_cache_bytes"
REQUESTS = "toolkit_requests_total"  # label finish_reason: stop, length, cancelled, error, rejected
GRAMMAR_MASK_SECONDS = "toolkit_grammar_mask_seconds_total"  # computing and applying grammar bitmasks
GRAMMAR_MASKED_ROWS = "toolkit_grammar_masked_rows_total"  # sequence-steps that were masked
GRAMMAR_MASKED_STEPS = "toolkit_grammar_masked_steps_total"  # batched steps with at least one masked row

TTFT_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS_S = [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


class NullMetrics:
    """Does nothing; every hook the scheduler calls."""

    def prompt_tokens(self, n: int) -> None: ...
    def generated_tokens(self, n: int) -> None: ...
    def time_to_first_token(self, seconds: float) -> None: ...
    def inter_token_latency(self, seconds: float) -> None: ...
    def batch_size(self, n: int) -> None: ...
    def active_sequences(self, n: int) -> None: ...
    def queue_depth(self, n: int) -> None: ...
    def kv_cache_bytes(self, n: int) -> None: ...
    def finished(self, reason: str) -> None: ...
    def grammar_masks(self, rows: int, seconds: float) -> None: ...


class _Gauge:
    """A gauge that crosses to the server only when its value changes.

    Inside Triton every metric update is a round trip from the backend stub to the server process;
    the scheduler reports its gauges every step, and at batch 1 most steps change none of them.
    """

    def __init__(self, metric: Any):
        self.metric = metric
        self.value: float | None = None

    def set(self, value: float) -> None:
        if value != self.value:
            self.value = value
            _safe(self.metric.set, value)


def _safe(update: Any, value: float) -> None:
    # A metric update must never break generation (or leave a stream without its final response).
    try:
        update(value)
    except Exception:
        log.warning("metric update failed", exc_info=True)


class TritonMetrics(NullMetrics):
    """The hooks as ``pb_utils.MetricFamily`` metrics labelled with the model name and version."""

    def __init__(self, pb_utils: Any, model: str, version: str):
        family = pb_utils.MetricFamily
        labels = {"model": model, "version": version}

        # Triton invalidates a Metric whose MetricFamily was garbage-collected: keep every family alive.
        self._families: list[Any] = []

        def metric(name: str, doc: str, kind: Any, buckets: list[float] | None = None, **extra: str) -> Any:
            fam = family(name=name, description=doc, kind=kind)
            self._families.append(fam)
            if buckets is not None:
                return fam.Metric(labels={**labels, **extra}, buckets=buckets)
            return fam.Metric(labels={**labels, **extra})

        counter, gauge, histogram = family.COUNTER, family.GAUGE, family.HISTOGRAM
        self._prompt = metric(PROMPT_TOKENS, "Prompt tokens prefilled", counter)
        self._generated = metric(GENERATED_TOKENS, "Tokens generated and streamed", counter)
        self._ttft = metric(TIME_TO_FIRST_TOKEN, "Seconds from enqueue to the first token", histogram, TTFT_BUCKETS_S)
        self._itl = metric(INTER_TOKEN_LATENCY, "Seconds between streamed tokens", histogram, ITL_BUCKETS_S)
        self._batch = metric(BATCH_SIZE, "Sequences in each batched decode forward", histogram,
                             [float(b) for b in BATCH_BUCKETS])
        self._last_batch = _Gauge(metric(LAST_BATCH_SIZE, "Sequences in the latest decode forward", gauge))
        self._active = _Gauge(metric(ACTIVE_SEQUENCES, "Sequences holding a slot (prefilled or decoding)", gauge))
        self._queue = _Gauge(metric(QUEUE_DEPTH, "Requests waiting for a slot", gauge))
        self._kv = _Gauge(metric(KV_CACHE_BYTES, "Bytes of KV cache held by the decode batch", gauge))
        self._mask_seconds = metric(GRAMMAR_MASK_SECONDS, "Seconds spent computing and applying grammar masks", counter)
        self._masked_rows = metric(GRAMMAR_MASKED_ROWS, "Sequence steps masked by a grammar", counter)
        self._masked_steps = metric(GRAMMAR_MASKED_STEPS, "Batched steps with a grammar-masked row", counter)
        requests = family(name=REQUESTS, description="Finished requests by finish reason", kind=counter)
        self._families.append(requests)
        self._requests = {
            reason: requests.Metric(labels={**labels, "finish_reason": reason})
            for reason in ("stop", "length", "cancelled", "error", "rejected")
        }

    def prompt_tokens(self, n: int) -> None:
        _safe(self._prompt.increment, float(n))

    def generated_tokens(self, n: int) -> None:
        _safe(self._generated.increment, float(n))

    def time_to_first_token(self, seconds: float) -> None:
        _safe(self._ttft.observe, seconds)

    def inter_token_latency(self, seconds: float) -> None:
        _safe(self._itl.observe, seconds)

    def batch_size(self, n: int) -> None:
        _safe(self._batch.observe, float(n))
        self._last_batch.set(float(n))

    def active_sequences(self, n: int) -> None:
        self._active.set(float(n))

    def queue_depth(self, n: int) -> None:
        self._queue.set(float(n))

    def kv_cache_bytes(self, n: int) -> None:
        self._kv.set(float(n))

    def grammar_masks(self, rows: int, seconds: float) -> None:
        _safe(self._mask_seconds.increment, seconds)
        _safe(self._masked_rows.increment, float(rows))
        _safe(self._masked_steps.increment, 1.0)

    def finished(self, reason: str) -> None:
        metric = self._requests.get(reason)
        if metric is not None:
            _safe(metric.increment, 1.0)
