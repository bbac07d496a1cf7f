"""Streamed responses sent off the scheduler's thread, in order, merged when they queue up.

Inside Triton, a python-backend ``response_sender.send()`` returns only once the server process has
taken the response (an IPC round trip, done once per streamed token). Sent from the scheduler's
thread, every one of those waits adds to the decode step: sixteen of them per step at batch 16.
:class:`ResponseWriter` makes the send a queue put for the scheduler; its own thread does the waiting
while the next step runs, and the tokens of a stream that queued up meanwhile go as one response.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Target(Protocol):
    """One request's channel, written by the writer's thread only."""

    failed: bool  # set by the writer when a send raised; the owner stops generating for it

    def send_tokens(self, ids: list[int]) -> None: ...


_Item = tuple[Target, list[int] | None, Callable[[], None] | None]


class ResponseWriter:
    """One thread that sends every target's responses in the order they were queued (per target)."""

    def __init__(self, name: str = "response-writer") -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def tokens(self, target: Target, ids: list[int]) -> None:
        self._queue.put((target, list(ids), None))

    def end(self, target: Target, send: Callable[[], None]) -> None:
        """Queue the target's last response (`send` sends it), after its tokens already queued."""
        self._queue.put((target, None, send))

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            self._write([item for item in batch if item is not None])
            if stop:
                return

    def _write(self, batch: list[_Item]) -> None:
        pending: dict[Target, list[int]] = {}  # a target's tokens queued since its last send, in order
        for target, ids, send in batch:
            if ids is not None:
                pending.setdefault(target, []).extend(ids)
                continue
            self._send_tokens(target, pending.pop(target, []))
            try:
                if send is not None:
                    send()
            except Exception:
                if not target.failed:  # a target that failed before is usually a cancelled request
                    log.warning("could not send a final response", exc_info=True)
        for target, ids in pending.items():
            self._send_tokens(target, ids)

    @staticmethod
    def _send_tokens(target: Target, ids: list[int]) -> None:
        if not ids or target.failed:
            return
        try:
            target.send_tokens(ids)
        except Exception:
            log.warning("could not send a response; its request is cancelled", exc_info=True)
            target.failed = True
