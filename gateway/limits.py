"""Load shedding: body size, requests in flight, and per-key token buckets.

All three refuse work before it costs anything: an oversized body is refused before it is parsed,
and the in-flight bound and the rate limits are checked before a request reaches Triton. Each
refusal carries how long to wait (``Retry-After``).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.error_responses import BodyTooLargeError, TooManyRequestsError, to_error_response

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


class PerKeyLimiter:
    """At most ``limit`` requests in flight per caller, so one key cannot take every slot.

    Only callers with requests in flight are kept: the state is bounded by the global in-flight limit.
    """

    def __init__(self, limit: int | None, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.counts: dict[str, int] = {}

    def acquire(self, key: str) -> None:
        if self.limit is None:
            return
        count = self.counts.get(key, 0)
        if count >= self.limit:
            raise TooManyRequestsError(
                f"this API key has {count} requests in flight, its limit; retry when one finishes",
                retry_after_s=self.retry_after_s,
                code="too_many_concurrent_requests",
            )
        self.counts[key] = count + 1

    def release(self, key: str) -> None:
        if self.limit is None:
            return
        count = self.counts.get(key, 0) - 1
        if count > 0:
            self.counts[key] = count
        else:
            self.counts.pop(key, None)


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


class _Buckets:
    """Token buckets by caller, least recently used dropped first past ``max_keys`` (bounded memory).

    A dropped caller starts again with a full bucket; a caller idle for a minute has one anyway.
    """

    def __init__(self, capacity: int, max_keys: int, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.max_keys = max_keys
        self.clock = clock
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, key: str) -> TokenBucket:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.capacity, self.clock)
            while len(self.buckets) > self.max_keys:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
        return bucket


class RateLimiter:
    """Per API key: requests per minute and (prompt + completion) tokens per minute.

    Admission is in two steps so the cheap one comes first: :meth:`admit_request` before the prompt
    is rendered and tokenized (a caller out of requests, or in token debt, costs no tokenization),
    :meth:`admit_prompt` once its size is known.
    """

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._requests = _Buckets(requests_per_minute or 1, max_keys, clock)
        self._tokens = _Buckets(tokens_per_minute or 1, max_keys, clock)

    @property
    def tracked_keys(self) -> int:
        return max(len(self._requests.buckets), len(self._tokens.buckets))

    @staticmethod
    def _refuse(waits: list[tuple[float, str]]) -> None:
        blocked = [(wait, what) for wait, what in waits if wait > 0]
        if blocked:
            wait, what = max(blocked)
            raise TooManyRequestsError(
                f"rate limit of {what} reached for this API key; retry in {math.ceil(wait)} s",
                retry_after_s=math.ceil(wait),
                code="rate_limit_exceeded",
            )

    def admit_request(self, key: str) -> None:
        """Charge one request, or raise 429 if the key is out of requests or owes tokens."""
        waits: list[tuple[float, str]] = []
        if self.requests_per_minute:
            waits.append((self._requests.get(key).wait_s(1), f"{self.requests_per_minute} requests per minute"))
        if self.tokens_per_minute:
            waits.append((self._tokens.get(key).wait_s(1), f"{self.tokens_per_minute} tokens per minute"))
        self._refuse(waits)
        if self.requests_per_minute:
            self._requests.get(key).take(1)

    def admit_prompt(self, key: str, prompt_tokens: int) -> None:
        """Charge the prompt's tokens, or raise 429 with the wait."""
        if not self.tokens_per_minute:
            return
        bucket = self._tokens.get(key)
        self._refuse([(bucket.wait_s(max(prompt_tokens, 1)), f"{self.tokens_per_minute} tokens per minute")])
        bucket.take(prompt_tokens)

    def admit(self, key: str, prompt_tokens: int) -> None:
        """Both steps at once (a request whose prompt size is known)."""
        self.admit_request(key)
        self.admit_prompt(key, prompt_tokens)

    def charge_completion(self, key: str, completion_tokens: int) -> None:
        """Charge generated tokens after the fact; a debt delays the key's next request."""
        if self.tokens_per_minute and completion_tokens > 0:
            self._tokens.get(key).take(completion_tokens)
