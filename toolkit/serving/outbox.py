"""Responses and metric updates sent from a thread of their own, so the decode loop never waits on them.

Inside Triton's python backend every ``response_sender.send()`` and every custom-metric update is
a synchronous round trip to the server process (the stub waits until Triton has taken the
message). The decode loop makes one such call per generated token and a dozen a step for the
metrics; done on the decode thread they serialise with the next forward pass. :class:`Outbox`
runs them, in the order they were posted, on one background thread, which waits on the IPC
while the decode thread is back in onnxruntime (which releases the GIL).

:class:`QueuedStream` and :class:`QueuedMetrics` wrap the scheduler's stream and metrics with it.
A stream whose send failed is reported cancelled on the next poll, so the scheduler frees its slot
as it would have after a synchronous failure.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from toolkit.serving.model_metrics import NullMetrics

log = logging.getLogger(__name__)


class Outbox:
    """One background thread that runs posted calls in order; ``stop`` runs what is left first."""

    def __init__(self, name: str = "response-outbox") -> None:
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Outbox:
        self._thread.start()
        return self

    def post(self, call: Callable[..., Any], *args: Any) -> None:
        with self._cond:
            self._calls.append((call, args))
            self._cond.notify()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def pending(self) -> int:
        return len(self._calls)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._calls and not self._stopping:
                    self._cond.wait()
                if not self._calls:
                    return
                call, args = self._calls.popleft()
            try:
                call(*args)
            except Exception:  # a failing call must not stop the others
                log.warning("outbox call %s failed", getattr(call, "__qualname__", call), exc_info=True)


class QueuedStream:
    """A scheduler stream whose sends go through an :class:`Outbox`; a failed send cancels the request."""

    def __init__(self, inner: Any, outbox: Outbox) -> None:
        self.inner = inner
        self.outbox = outbox
        self.failed = False

    def _send_token(self, ids: list[int]) -> None:
        if self.failed:
            return  # the request is being cancelled: no more tokens
        try:
            self.inner.on_tokens(ids)
        except Exception:
            log.warning("could not send a token; cancelling its request", exc_info=True)
            self.failed = True

    def _send_final(self, method: Callable[..., Any], *args: Any) -> None:
        # Always attempted, even after a failed token: the final response is what releases the client.
        try:
            method(*args)
        except Exception:
            log.warning("could not send the final response", exc_info=True)

    def on_tokens(self, ids: list[int]) -> None:
        self.outbox.post(self._send_token, ids)

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.outbox.post(self._send_final, self.inner.on_finish, reason, prompt_tokens, completion_tokens)

    def on_error(self, message: str) -> None:
        self.outbox.post(self._send_final, self.inner.on_error, message)

    def is_cancelled(self) -> bool:
        return self.failed or bool(self.inner.is_cancelled())


class QueuedMetrics(NullMetrics):
    """The scheduler's metrics, updated from an :class:`Outbox` (same methods as the wrapped one)."""

    def __init__(self, inner: NullMetrics, outbox: Outbox) -> None:
        self.inner = inner
        self.outbox = outbox

    def prompt_tokens(self, n: int) -> None:
        self.outbox.post(self.inner.prompt_tokens, n)

    def generated_tokens(self, n: int) -> None:
        self.outbox.post(self.inner.generated_tokens, n)

    def time_to_first_token(self, seconds: float) -> None:
        self.outbox.post(self.inner.time_to_first_token, seconds)

    def inter_token_latency(self, seconds: float) -> None:
        self.outbox.post(self.inner.inter_token_latency, seconds)

    def batch_size(self, n: int) -> None:
        self.outbox.post(self.inner.batch_size, n)

    def active_sequences(self, n: int) -> None:
        self.outbox.post(self.inner.active_sequences, n)

    def queue_depth(self, n: int) -> None:
        self.outbox.post(self.inner.queue_depth, n)

    def kv_cache_bytes(self, n: int) -> None:
        self.outbox.post(self.inner.kv_cache_bytes, n)

    def finished(self, reason: str) -> None:
        self.outbox.post(self.inner.finished, reason)
