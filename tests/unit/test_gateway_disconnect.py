"""A non-streaming generation is cancelled when its client's connection closes (gateway.chat.serving)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from gateway.chat.serving import ChatService, Completion, watch_client


class _SlowService(ChatService):
    """`complete` that waits until told to finish, and records whether it was cancelled."""

    def __init__(self) -> None:
        super().__init__(state=None)  # type: ignore[arg-type]
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.cancelled = False

    async def complete(self, prepared: Any) -> Completion:
        self.started.set()
        try:
            await self.finish.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return Completion("done", "stop", None, [])  # type: ignore[arg-type]


class _Request:
    """One request in flight: the client's message queue, its slot's releases, and the handler's call."""

    def __init__(self, service: _SlowService) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.released: list[bool] = []
        self.prepared = SimpleNamespace(release=lambda: self.released.append(True))
        self.service = service

    def start(self, gone: asyncio.Task[None]) -> asyncio.Task[Completion | None]:
        return asyncio.create_task(self.service.complete_or_cancel(self.prepared, gone))  # type: ignore[arg-type]


async def test_a_disconnect_cancels_the_generation_and_frees_its_slot() -> None:
    request = _Request(_SlowService())
    async with watch_client(request.messages.get) as gone:
        call = request.start(gone)
        await request.service.started.wait()
        await request.messages.put({"type": "http.request", "body": b"", "more_body": False})  # not a disconnect
        await asyncio.sleep(0)
        assert not call.done()
        await request.messages.put({"type": "http.disconnect"})
        result = await asyncio.wait_for(call, timeout=10)
    assert result is None
    assert request.service.cancelled and request.released == [True]


async def test_a_client_that_stays_gets_the_completion() -> None:
    request = _Request(_SlowService())
    async with watch_client(request.messages.get) as gone:
        call = request.start(gone)
        await request.service.started.wait()
        request.service.finish.set()
        result = await asyncio.wait_for(call, timeout=10)
    assert result is not None and result.text == "done"
    assert not request.service.cancelled and request.released == [True]
    assert gone.cancelled()  # the watch ends with the handler
