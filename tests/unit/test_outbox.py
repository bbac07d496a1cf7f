"""The outbox: responses leave in order from their own thread; a failed send cancels the request, the
final response is still attempted, and stopping sends whatever was still queued."""

from __future__ import annotations

import threading

from serving_fakes import FakeRunner

from toolkit.serving.model_metrics import NullMetrics
from toolkit.serving.outbox import Outbox, QueuedMetrics, QueuedStream
from toolkit.serving.requests import GenerationRequest, SamplingParams
from toolkit.serving.scheduler import Scheduler


class Recorder:
    def __init__(self, fail_on_token: int | None = None) -> None:
        self.events: list[tuple[str, object]] = []
        self.threads: set[str] = set()
        self.fail_on_token = fail_on_token
        self.done = threading.Event()

    def on_tokens(self, ids: list[int]) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail_on_token is not None and len(self.events) == self.fail_on_token:
            raise RuntimeError("client went away")
        self.events.append(("tokens", ids))

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.events.append(("finish", reason))
        self.done.set()

    def on_error(self, message: str) -> None:
        self.events.append(("error", message))
        self.done.set()

    def is_cancelled(self) -> bool:
        return False


def test_tokens_leave_in_order_from_the_outbox_thread_then_the_final() -> None:
    outbox = Outbox().start()
    sink = Recorder()
    stream = QueuedStream(sink, outbox)
    for token in range(50):
        stream.on_tokens([token])
    stream.on_finish("length", 3, 50)
    assert sink.done.wait(5)
    outbox.stop()
    assert sink.events == [("tokens", [t]) for t in range(50)] + [("finish", "length")]
    assert sink.threads == {"response-outbox"}


def test_a_failed_send_cancels_the_request_in_the_scheduler_and_the_final_still_goes_out() -> None:
    outbox = Outbox().start()
    scheduler = Scheduler(FakeRunner(vocab_size=40), metrics=QueuedMetrics(NullMetrics(), outbox))
    scheduler.start()
    sink = Recorder(fail_on_token=2)
    request = GenerationRequest(prompt_ids=[3, 4], max_tokens=200, sampling=SamplingParams())
    scheduler.submit(request, QueuedStream(sink, outbox))
    assert sink.done.wait(10)
    scheduler.stop()
    outbox.stop()
    # Two tokens, the failed third, nothing more, then the final response with finish_reason cancelled.
    assert [kind for kind, _ in sink.events] == ["tokens", "tokens", "finish"]
    assert sink.events[-1] == ("finish", "cancelled")


def test_stop_sends_what_is_still_queued() -> None:
    outbox = Outbox()  # not started: everything queues
    sink = Recorder()
    stream = QueuedStream(sink, outbox)
    stream.on_tokens([1])
    stream.on_error("the model is shutting down")
    assert outbox.pending == 2 and sink.events == []
    outbox.start()
    outbox.stop()
    assert sink.events == [("tokens", [1]), ("error", "the model is shutting down")]
