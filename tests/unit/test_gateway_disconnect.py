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


def _client() -> tuple[asyncio.Queue[dict[str, Any]], Any]:
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    return messages, messages.get


async def test_a_disconnect_cancels_the_generation_and_frees_its_slot() -> None:
    service, released = _SlowService(), []
    messages, receive = _client()
    prepared = SimpleNamespace(release=lambda: released.append(True))
    async with watch_client(receive) as gone:
        call = asyncio.create_task(service.complete_or_cancel(prepared, gone))  # type: ignore[arg-type]
        await service.started.wait()
        await messages.put({"type": "http.request", "body": b"", "more_body": False})  # not a disconnect
        await asyncio.sleep(0)
        assert not call.done()
        await messages.put({"type": "http.disconnect"})
        result = await asyncio.wait_for(call, timeout=10)
    assert result is None
    assert service.cancelled and released == [True]


async def test_a_client_that_stays_gets_the_completion() -> None:
    service, released = _SlowService(), []
    _, receive = _client()
    prepared = SimpleNamespace(release=lambda: released.append(True))
    async with watch_client(receive) as gone:
        call = asyncio.create_task(service.complete_or_cancel(prepared, gone))  # type: ignore[arg-type]
        await service.started.wait()
        service.finish.set()
        result = await asyncio.wait_for(call, timeout=10)
    assert result is not None and result.text == "done"
    assert not service.cancelled and released == [True]
    assert gone.cancelled()  # the watch ends with the handler
