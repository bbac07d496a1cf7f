"""A small client of the gateway's OpenAI API for ``toolkit chat``: models, and streamed chat completions.

httpx against ``/v1/models`` and ``/v1/chat/completions`` (server-sent events). Every failure
becomes a :class:`ChatError` with one readable line: the gateway's own OpenAI-shaped message when
it answered, or what to do when it could not be reached. Closing the stream (Ctrl-C) closes the
HTTP response, which makes the gateway cancel the generation on Triton.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from toolkit.errors import ToolkitError

_HINTS = {
    401: "pass --api-key (or set TOOLKIT_API_KEY)",
    403: "the gateway refuses this key here",
    404: "list the models with /model in a chat, or GET /v1/models",
    429: "the gateway is busy or rate-limits this key; retry in a moment",
    503: "Triton is not ready; retry in a moment",
}


class ChatError(ToolkitError):
    """A request to the gateway failed; the message is one line meant for the user."""


@dataclass
class StreamEvent:
    """A text delta; the last event also has the finish reason and the token usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    model: str | None = None


def error_line(status: int, body: str) -> str:
    """One line for an HTTP error: the OpenAI error message when there is one, and a hint."""
    message = body.strip()[:200] or "no message"
    try:
        error = json.loads(body).get("error") if body.strip().startswith("{") else None
    except ValueError:
        error = None
    if isinstance(error, dict) and error.get("message"):
        message = str(error["message"])
    hint = _HINTS.get(status)
    return f"{status}: {message}" + (f" ({hint})" if hint else "")


class GatewayClient:
    """The gateway at `base_url` (e.g. http://127.0.0.1:8080), with an optional Bearer key."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout_s, connect=5.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, err: httpx.TransportError) -> ChatError:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return ChatError(f"cannot reach the gateway at {self.base_url} ({reason}); is `toolkit serve` running?")

    def models(self) -> list[dict[str, Any]]:
        """The gateway's model cards (``GET /v1/models``)."""
        try:
            response = self._http.get("/v1/models")
        except httpx.TransportError as err:
            raise self._unreachable(err) from None
        if response.status_code != 200:
            raise ChatError(error_line(response.status_code, response.text))
        data: list[dict[str, Any]] = response.json().get("data", [])
        return data

    def stream_chat(self, body: dict[str, Any]) -> Iterator[StreamEvent]:
        """Stream one chat completion; the generator's close (or Ctrl-C) closes the response."""
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=payload) as response:
                if response.status_code != 200:
                    response.read()
                    raise ChatError(error_line(response.status_code, response.text))
                yield from _events(response.iter_lines())
        except httpx.TransportError as err:
            raise self._unreachable(err) from None


def _events(lines: Iterator[str]) -> Iterator[StreamEvent]:
    """OpenAI SSE lines to events; an in-stream error (after the headers were sent) is a ChatError."""
    finish: StreamEvent | None = None
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators and ": ping" comments
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"]
            raise ChatError(f"the answer failed: {error.get('message', error)}")
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") or ""
            if choice.get("finish_reason"):
                finish = StreamEvent(text, choice["finish_reason"], model=chunk.get("model"))
            elif text:
                yield StreamEvent(text, model=chunk.get("model"))
        if chunk.get("usage") and finish is not None:
            finish.usage = dict(chunk["usage"])
    if finish is None:
        raise ChatError("the stream ended before the answer was complete")
    yield finish
