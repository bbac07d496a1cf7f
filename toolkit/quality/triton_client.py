"""A small tritonclient gRPC streaming client of the generation model (gate, benchmark and tests).

Many requests share one bidirectional stream and are told apart by request id; each result
records the arrival time of every token, for time-to-first-token and inter-token latency.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import tritonclient.grpc as grpcclient

from toolkit.repository import contract


@dataclass
class StreamResult:
    request_id: str
    sent_at: float = 0.0
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.sent_at if self.token_times else None

    def inter_token_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]


def generation_inputs(prompt_ids: Sequence[int], **values: Any) -> list[grpcclient.InferInput]:
    """The generation model's input tensors for one request (batch dimension 1); a value of None leaves one out.

    `values` are optional inputs by name (``max_tokens``, ``temperature``, ...: ``contract.OPTIONAL_INPUTS``).
    """
    inputs = []
    for name, array in contract.request_arrays(prompt_ids, **values).items():
        item = grpcclient.InferInput(name, list(array.shape), contract.input_spec(name).dtype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


class GenerationClient:
    """One gRPC stream to the generation model; ``submit`` many requests, ``wait`` for them."""

    def __init__(self, url: str, model: str):
        self.model = model
        self.client = grpcclient.InferenceServerClient(url)
        self._results: dict[str, StreamResult] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.client.start_stream(callback=self._on_response)

    def _on_response(self, result: Any, error: Any) -> None:
        now = time.perf_counter()
        if error is not None:
            # Stream errors carry no request id; they belong to the single request in flight (tests send
            # requests that may fail one per client).
            with self._lock:
                pending = [r for r in self._results.values() if not r.done.is_set()]
            for first in pending[:1]:
                first.error = str(error)
                first.done.set()
            return
        response = result.get_response()
        with self._lock:
            target = self._results.get(response.id)
        if target is None:
            return
        ids = result.as_numpy(contract.OUTPUT_IDS)
        if ids is not None and ids.size:
            target.tokens.extend(int(t) for t in ids.reshape(-1))
            target.token_times.extend([now] * int(ids.size))
        reason = result.as_numpy(contract.FINISH_REASON)
        if reason is not None and reason.reshape(-1)[0]:
            target.finish_reason = reason.reshape(-1)[0].decode()
            target.prompt_tokens = int(result.as_numpy(contract.PROMPT_TOKENS).reshape(-1)[0])
            target.completion_tokens = int(result.as_numpy(contract.COMPLETION_TOKENS).reshape(-1)[0])
            target.done.set()

    def submit(self, prompt_ids: Sequence[int], **parameters: Any) -> StreamResult:
        """Send one request on the stream; its tokens arrive in the returned result."""
        return self.submit_inputs(generation_inputs(prompt_ids, **parameters))

    def submit_inputs(
        self, inputs: list[grpcclient.InferInput], request_id: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> StreamResult:
        rid = request_id or f"r{next(self._ids)}"
        result = StreamResult(rid)
        with self._lock:
            self._results[rid] = result
        result.sent_at = time.perf_counter()
        self.client.async_stream_infer(self.model, inputs, request_id=rid, parameters=parameters)
        return result

    def wait(self, results: Sequence[StreamResult], timeout_s: float) -> None:
        """Wait until every result has finished or errored; TimeoutError names how many did not."""
        deadline = time.monotonic() + timeout_s
        for result in results:
            if not result.done.wait(max(0.0, deadline - time.monotonic())):
                open_ = sum(not r.done.is_set() for r in results)
                raise TimeoutError(f"{open_} of {len(results)} streams still open after {timeout_s:.0f}s")

    def close(self, cancel: bool = False) -> None:
        """Stop the stream (``cancel`` cancels the requests still in flight) and close the channel."""
        try:
            self.client.stop_stream(cancel_requests=cancel)
        finally:
            self.client.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
