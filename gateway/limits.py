"""Load shedding: body size, requests in flight, and per-key token buckets.

All three refuse work before it costs anything: an oversized body is refused before it is parsed,
and the in-flight bound and the rate limits are checked before a request reaches Triton. Each
refusal carries how long to wait (``Retry-After``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import BodyTooLargeError, TooManyRequestsError, to_error_response

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodySizeLimitMiddleware:
    """413 for a body over ``max_bytes``: by Content-Length at once, else while it streams in.

    The body is read here, before routing, and replayed to the app; after it, ``receive`` goes to
    the server again so the app still sees ``http.disconnect`` (streams are cancelled by it).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        too_large = BodyTooLargeError(f"request body is larger than the limit of {self.max_bytes} bytes")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await to_error_response(too_large)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await to_error_response(too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class InFlightLimiter:
    """At most ``limit`` generation requests at once; the next one is refused, not queued."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.count = 0

    def acquire(self) -> None:
        """Take a slot or raise 429 (the event loop is single-threaded, so no lock is needed)."""
        if self.count >= self.limit:
            raise TooManyRequestsError(
                f"the gateway is at its limit of {self.limit} requests in flight; retry shortly",
                retry_after_s=self.retry_after_s,
                code="overloaded",
            )
        self.count += 1

    def release(self) -> None:
        self.count = max(0, self.count - 1)


@dataclass
class TokenBucket:
    """``capacity`` units refilled evenly over a minute; the balance may go negative (a debt)."""

    capacity: float
    clock: Callable[[], float] = time.monotonic
    balance: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.balance = self.capacity
        self.updated = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.balance = min(self.capacity, self.balance + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` units are available (0: now). Asking more than capacity waits for a full bucket."""
        self._refill()
        needed = min(amount, self.capacity) - self.balance
        return 0.0 if needed <= 0 else needed * 60.0 / self.capacity

    def take(self, amount: float) -> None:
        """Spend `amount` (after :meth:`wait_s` said 0, or to charge usage after the fact)."""
        self._refill()
        self.balance -= amount


class RateLimiter:
    """Per API key: requests per minute and (prompt + completion) tokens per minute."""

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def admit(self, key: str, prompt_tokens: int) -> None:
        """Charge one request and its prompt tokens, or raise 429 with the wait."""
        waits: list[tuple[float, str]] = []
        if self.requests_per_minute:
            bucket = self._requests.setdefault(key, TokenBucket(self.requests_per_minute, self._clock))
            waits.append((bucket.wait_s(1), f"{self.requests_per_minute} requests per minute"))
        if self.tokens_per_minute:
            bucket = self._tokens.setdefault(key, TokenBucket(self.tokens_per_minute, self._clock))
            waits.append((bucket.wait_s(max(prompt_tokens, 1)), f"{self.tokens_per_minute} tokens per minute"))
        blocked = [(wait, what) for wait, what in waits if wait > 0]
        if blocked:
            wait, what = max(blocked)
            raise TooManyRequestsError(
                f"rate limit of {what} reached for this API key; retry in {math.ceil(wait)} s",
                retry_after_s=math.ceil(wait),
                code="rate_limit_exceeded",
            )
        if self.requests_per_minute:
            self._requests[key].take(1)
        if self.tokens_per_minute:
            self._tokens[key].take(prompt_tokens)

    def charge_completion(self, key: str, completion_tokens: int) -> None:
        """Charge generated tokens after the fact; a debt delays the key's next request."""
        if self.tokens_per_minute and completion_tokens > 0:
            self._tokens.setdefault(key, TokenBucket(self.tokens_per_minute, self._clock)).take(completion_tokens)
