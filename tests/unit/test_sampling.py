"""Per-request sampling and stop logic."""

from __future__ import annotations

import numpy as np

from toolkit.runtime.requests import SamplingParams
from toolkit.runtime.sampling import Sampler, StopState

LOGITS = np.asarray([0.1, 2.0, -1.0, 1.5, 0.3], dtype=np.float32)


def test_temperature_zero_is_argmax() -> None:
    assert Sampler(SamplingParams(temperature=0.0), [0]).sample(LOGITS) == 1


def test_same_seed_same_draws_different_seed_differs() -> None:
    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=5.0, seed=seed), [0])
        return [sampler.sample(LOGITS) for _ in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_one_is_greedy_even_when_hot() -> None:
    sampler = Sampler(SamplingParams(temperature=100.0, top_k=1, seed=0), [0])
    assert {sampler.sample(LOGITS) for _ in range(30)} == {1}


def test_top_k_restricts_to_the_k_best() -> None:
    sampler = Sampler(SamplingParams(temperature=100.0, top_k=2, seed=0), [0])
    assert {sampler.sample(LOGITS) for _ in range(200)} == {1, 3}


def test_small_top_p_keeps_only_the_head() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.05, seed=0), [0])
    assert {sampler.sample(LOGITS) for _ in range(50)} == {1}


def test_top_p_one_can_reach_every_token() -> None:
    sampler = Sampler(SamplingParams(temperature=50.0, top_p=1.0, seed=3), [0])
    assert {sampler.sample(LOGITS) for _ in range(500)} == {0, 1, 2, 3, 4}


def test_repetition_penalty_demotes_seen_tokens() -> None:
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[1])
    # token 1 (2.0) halves to 1.0, so 3 (1.5) wins greedy
    assert sampler.sample(LOGITS) == 3
    sampler.observe(3)
    # 3 halves to 0.75; 1 is 1.0 -> 1 wins again
    assert sampler.sample(LOGITS) == 1
    negative = np.asarray([-1.0, -0.5], dtype=np.float32)
    assert Sampler(SamplingParams(repetition_penalty=3.0), [1]).sample(negative) == 0


def test_penalty_does_not_modify_the_callers_logits() -> None:
    logits = LOGITS.copy()
    Sampler(SamplingParams(repetition_penalty=2.0), [1]).sample(logits)
    assert np.array_equal(logits, LOGITS)


def test_stop_state_stop_token_and_length() -> None:
    stop = StopState(frozenset({9}), max_tokens=3)
    assert stop.accept(4) and not stop.done
    assert not stop.accept(9)
    assert stop.finish_reason == "stop" and stop.generated == 1
    length = StopState(frozenset(), max_tokens=2)
    assert length.accept(1) and length.accept(2)
    assert length.finish_reason == "length" and length.generated == 2
