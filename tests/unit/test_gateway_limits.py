"""Token buckets, per-key rate limits and the in-flight bound."""

from __future__ import annotations

import pytest

from gateway.error_responses import TooManyRequestsError
from gateway.limits import InFlightLimiter, RateLimiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_evenly_over_a_minute() -> None:
    clock = Clock()
    bucket = TokenBucket(60, clock)
    assert bucket.wait_s(60) == 0
    bucket.take(60)
    assert bucket.wait_s(1) == pytest.approx(1.0)
    clock.now += 30
    assert bucket.wait_s(30) == 0
    assert bucket.wait_s(31) == pytest.approx(1.0)
    clock.now += 1000
    assert bucket.balance <= 60 and bucket.wait_s(60) == 0  # never above capacity


def test_requests_per_minute_per_key_with_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=2, tokens_per_minute=None, clock=clock)
    limiter.admit("alice", 10)
    limiter.admit("alice", 10)
    with pytest.raises(TooManyRequestsError) as info:
        limiter.admit("alice", 10)
    assert info.value.retry_after_s == 30 and "2 requests per minute" in info.value.message
    limiter.admit("bob", 10)  # another key has its own bucket
    clock.now += 30
    limiter.admit("alice", 10)


def test_tokens_per_minute_charges_prompt_then_completion_debt() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=600, clock=clock)
    limiter.admit("k", 100)
    limiter.charge_completion("k", 800)  # the reply ran over: the key now owes 300 tokens
    with pytest.raises(TooManyRequestsError) as info:
        limiter.admit("k", 10)
    assert info.value.retry_after_s == 31  # (300 debt + 10) tokens at 10 tokens/s
    clock.now += 31
    limiter.admit("k", 10)


def test_prompt_larger_than_the_bucket_waits_for_a_full_bucket_not_forever() -> None:
    clock = Clock()
    limiter = RateLimiter(None, 100, clock=clock)
    limiter.admit("k", 5000)  # a full bucket admits it (and goes into debt)
    with pytest.raises(TooManyRequestsError):
        limiter.admit("k", 5000)


def test_in_flight_bound() -> None:
    limiter = InFlightLimiter(limit=2, retry_after_s=3)
    limiter.acquire()
    limiter.acquire()
    with pytest.raises(TooManyRequestsError) as info:
        limiter.acquire()
    assert info.value.retry_after_s == 3 and info.value.status_code == 429
    limiter.release()
    limiter.acquire()
    assert limiter.count == 2
