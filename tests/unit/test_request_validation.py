"""Every bad request gets one clear error; good ones get the documented defaults."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.runtime.requests import Limits, RequestError, parse_request

LIMITS = Limits(vocab_size=100, context_length=32, max_new_tokens_limit=20, stop_token_ids=frozenset({2}))


def _ids(*ids: int) -> np.ndarray:
    return np.asarray([ids], dtype=np.int64)


def test_defaults_max_tokens_to_remaining_context_capped_by_the_limit() -> None:
    short = parse_request({"input_ids": _ids(5, 6)}, LIMITS)
    assert short.prompt_ids == [5, 6]
    assert short.max_tokens == 20  # the limit, below the 30 remaining
    long = parse_request({"input_ids": _ids(*range(3, 23))}, LIMITS)
    assert long.max_tokens == 12  # 32 - 20
    assert short.sampling.greedy and short.stop_token_ids == frozenset({2})


def test_all_parameters_are_read() -> None:
    request = parse_request({
        "input_ids": _ids(5), "max_tokens": np.asarray([[4]], np.int32), "temperature": np.asarray([[0.5]], np.float32),
        "top_p": np.asarray([[0.9]], np.float32), "top_k": np.asarray([[5]], np.int32),
        "seed": np.asarray([[7]], np.int64), "repetition_penalty": np.asarray([[1.1]], np.float32),
        "stop_token_ids": np.asarray([[9, 10]], np.int64),
    }, LIMITS)
    assert request.max_tokens == 4
    assert request.sampling.temperature == pytest.approx(0.5) and request.sampling.top_k == 5
    assert request.sampling.seed == 7 and request.sampling.top_p == pytest.approx(0.9)
    assert request.stop_token_ids == frozenset({2, 9, 10})


def test_ignore_eos_drops_the_manifest_stops_but_keeps_the_requests_own() -> None:
    flag = np.asarray([[True]], np.bool_)
    only_own = parse_request({"input_ids": _ids(5), "ignore_eos": flag, "stop_token_ids": _ids(9)}, LIMITS)
    assert only_own.stop_token_ids == frozenset({9})
    assert parse_request({"input_ids": _ids(5), "ignore_eos": flag}, LIMITS).stop_token_ids == frozenset()
    off = parse_request({"input_ids": _ids(5), "ignore_eos": np.asarray([[False]], np.bool_)}, LIMITS)
    assert off.stop_token_ids == frozenset({2})
    with pytest.raises(RequestError, match="ignore_eos must be a single BOOL"):
        parse_request({"input_ids": _ids(5), "ignore_eos": np.asarray([[1]], np.int32)}, LIMITS)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "missing required input input_ids"),
        ({"input_ids": np.zeros((1, 0), np.int64)}, "input_ids is empty"),
        ({"input_ids": _ids(5, 100)}, "id 100 outside the vocabulary"),
        ({"input_ids": _ids(-1)}, "id -1 outside the vocabulary"),
        ({"input_ids": np.asarray([[1.0, 2.0]], np.float32)}, "input_ids must be integers"),
        ({"input_ids": _ids(*([5] * 32))}, "prompt has 32 tokens; the context is 32"),
        ({"input_ids": _ids(5), "max_tokens": np.asarray([[0]], np.int32)}, "max_tokens must be > 0"),
        ({"input_ids": _ids(5), "max_tokens": np.asarray([[-3]], np.int32)}, "max_tokens must be > 0"),
        ({"input_ids": _ids(5), "max_tokens": np.asarray([[21]], np.int32)}, "at most 20"),
        ({"input_ids": _ids(*range(5, 20)), "max_tokens": np.asarray([[18]], np.int32)}, "only 17 tokens"),
        ({"input_ids": _ids(5), "max_tokens": np.asarray([[1.5]], np.float32)}, "max_tokens must be an integer"),
        ({"input_ids": _ids(5), "max_tokens": np.asarray([[1, 2]], np.int32)}, "single value"),
        ({"input_ids": _ids(5), "temperature": np.asarray([[-0.1]], np.float32)}, "temperature must be >= 0"),
        ({"input_ids": _ids(5), "temperature": np.asarray([[np.nan]], np.float32)}, "must be finite"),
        ({"input_ids": _ids(5), "temperature": np.asarray([[b"hot"]], object)}, "temperature must be a number"),
        ({"input_ids": _ids(5), "top_p": np.asarray([[0.0]], np.float32)}, "top_p must be in"),
        ({"input_ids": _ids(5), "top_k": np.asarray([[-1]], np.int32)}, "top_k must be >= 0"),
        ({"input_ids": _ids(5), "seed": np.asarray([[-1]], np.int64)}, "seed must be >= 0"),
        ({"input_ids": _ids(5), "repetition_penalty": np.asarray([[0.0]], np.float32)}, "repetition_penalty"),
        ({"input_ids": _ids(5), "stop_token_ids": np.asarray([[500]], np.int64)}, "stop_token_ids has id 500"),
        ({"input_ids": _ids(5), "beam_width": np.asarray([[2]], np.int32)}, "unknown input(s) beam_width"),
    ],
)
def test_bad_requests_get_a_clear_error(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_request(inputs, LIMITS)


def test_unknown_request_parameters_are_rejected() -> None:
    with pytest.raises(RequestError, match="unknown request parameter"):
        parse_request({"input_ids": _ids(5)}, LIMITS, parameters={"temperature": 0.2})
