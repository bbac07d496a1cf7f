"""The response writer: per-stream order, tokens merged when they queue up, finals after tokens, failures."""

from __future__ import annotations

import threading

from toolkit.serving.response_writer import ResponseWriter


class Recorder:
    def __init__(self, log: list[tuple[str, object]], name: str, gate: threading.Event | None = None,
                 fail_after: int | None = None) -> None:
        self.log, self.name, self.gate, self.fail_after = log, name, gate, fail_after
        self.failed = False
        self.sends = 0
        self.entered = threading.Event()  # a send has started

    def send_tokens(self, ids: list[int]) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.sends += 1
        if self.fail_after is not None and self.sends > self.fail_after:
            raise RuntimeError("Response sender has been closed")
        self.log.append((self.name, list(ids)))

    def final(self) -> None:
        self.log.append((self.name, "final"))


def test_tokens_queued_behind_a_slow_send_go_as_one_response_and_the_final_comes_last() -> None:
    log: list[tuple[str, object]] = []
    gate = threading.Event()
    slow, other = Recorder(log, "a", gate), Recorder(log, "b")
    writer = ResponseWriter()
    writer.tokens(slow, [1])  # the writer's thread blocks in this send until the gate opens
    assert slow.entered.wait(5)
    for token in (2, 3, 4):
        writer.tokens(slow, [token])
        writer.tokens(other, [10 + token])
    writer.end(slow, slow.final)
    writer.tokens(other, [20])
    gate.set()
    writer.close()
    assert [entry for entry in log if entry[0] == "a"] == [("a", [1]), ("a", [2, 3, 4]), ("a", "final")]
    assert [entry for entry in log if entry[0] == "b"] == [("b", [12, 13, 14, 20])]
    assert slow.sends == 2  # four tokens, two round trips


def test_a_failed_send_marks_the_target_and_later_tokens_are_dropped_but_the_final_is_tried() -> None:
    log: list[tuple[str, object]] = []
    target = Recorder(log, "a", fail_after=1)
    writer = ResponseWriter()
    writer.tokens(target, [1])
    writer.close()  # one batch at a time: the first send has happened before the next tokens queue
    assert not target.failed
    writer = ResponseWriter()
    writer.tokens(target, [2])
    writer.close()
    assert target.failed
    writer = ResponseWriter()
    writer.tokens(target, [3])
    writer.end(target, target.final)
    writer.close()
    assert log == [("a", [1]), ("a", "final")] and target.sends == 2


def test_a_final_that_raises_does_not_stop_the_writer() -> None:
    log: list[tuple[str, object]] = []
    first, second = Recorder(log, "a"), Recorder(log, "b")

    def boom() -> None:
        raise RuntimeError("gone")

    writer = ResponseWriter()
    writer.end(first, boom)
    writer.tokens(second, [5])
    writer.end(second, second.final)
    writer.close()
    assert log == [("b", [5]), ("b", "final")]
