"""Validation of one generation request: raw named arrays in, a typed :class:`GenerationRequest` out.

Pure numpy, no Triton. The Triton adapter hands in ``{input name: np.ndarray}`` (each with the
leading batch dimension of 1 the generation model's ``max_batch_size > 0`` implies); every problem
raises :class:`RequestError` with one line the client can act on, which the adapter turns into an
error response with the final flag, so a bad request never leaves a stream hanging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.repository import contract


class RequestError(ValueError):
    """The request is invalid; the message says which input and what is allowed."""


class QueueFullError(RuntimeError):
    """The scheduler's queue is full; the client should retry later."""


@dataclass(frozen=True)
class Limits:
    """What the served model accepts, from the manifest and the model config parameters."""

    vocab_size: int
    context_length: int
    max_new_tokens_limit: int
    stop_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; ``temperature == 0`` means greedy."""

    temperature: float = contract.DEFAULT_TEMPERATURE
    top_p: float = contract.DEFAULT_TOP_P
    top_k: int = contract.DEFAULT_TOP_K
    seed: int | None = None
    repetition_penalty: float = contract.DEFAULT_REPETITION_PENALTY

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    grammar: bytes | None = None  # a JSON grammar spec (toolkit.runtime.grammar); compiled by the scheduler
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and k alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens


MAX_GRAMMAR_BYTES = 1 << 20
_KNOWN = (contract.INPUT_IDS, *contract.OPTIONAL_INPUTS)


def _int_values(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise RequestError(f"{name} must be integers (INT64), got {arr.dtype}")
    return arr.reshape(-1).astype(np.int64)


def _scalar(name: str, value: Any, kind: str) -> float | int:
    arr = np.asarray(value)
    allowed = "iu" if kind == "int" else "fiu"
    if arr.dtype.kind not in allowed:
        wanted = "an integer" if kind == "int" else "a number"
        raise RequestError(f"{name} must be {wanted}, got {arr.dtype}")
    if arr.size != 1:
        raise RequestError(f"{name} must be a single value, got {arr.size} values")
    item = arr.reshape(-1)[0]
    if kind == "int":
        return int(item)
    number = float(item)
    if not np.isfinite(number):
        raise RequestError(f"{name} must be finite, got {number}")
    return number


def parse_request(
    inputs: Mapping[str, Any], limits: Limits, parameters: Mapping[str, Any] | None = None
) -> GenerationRequest:
    """Validate the named inputs of one request against ``limits``.

    ``max_tokens`` defaults to the remaining context, capped at ``max_new_tokens_limit``; an
    explicit value over either bound is an error (the client asked for something it cannot get).
    """
    if parameters:
        raise RequestError(
            f"unknown request parameter(s) {', '.join(sorted(parameters))}; sampling parameters are input "
            f"tensors: {', '.join(contract.OPTIONAL_INPUTS)}"
        )
    unknown = sorted(set(inputs) - set(_KNOWN))
    if unknown:
        raise RequestError(f"unknown input(s) {', '.join(unknown)}; accepted: {', '.join(_KNOWN)}")
    if contract.INPUT_IDS not in inputs or inputs[contract.INPUT_IDS] is None:
        raise RequestError(f"missing required input {contract.INPUT_IDS}")
    ids = _int_values(contract.INPUT_IDS, inputs[contract.INPUT_IDS])
    if ids.size == 0:
        raise RequestError(f"{contract.INPUT_IDS} is empty: send at least one prompt token")
    bad = ids[(ids < 0) | (ids >= limits.vocab_size)]
    if bad.size:
        raise RequestError(
            f"{contract.INPUT_IDS} has id {int(bad[0])} outside the vocabulary [0, {limits.vocab_size})"
        )
    prompt_len = int(ids.size)
    if prompt_len >= limits.context_length:
        raise RequestError(
            f"prompt has {prompt_len} tokens; the context is {limits.context_length} tokens, so the prompt "
            f"must be at most {limits.context_length - 1}"
        )
    remaining = limits.context_length - prompt_len
    values = {name: inputs[name] for name in contract.OPTIONAL_INPUTS if inputs.get(name) is not None}

    if contract.MAX_TOKENS in values:
        max_tokens = int(_scalar(contract.MAX_TOKENS, values[contract.MAX_TOKENS], "int"))
        if max_tokens <= 0:
            raise RequestError(f"{contract.MAX_TOKENS} must be > 0, got {max_tokens}")
        if max_tokens > limits.max_new_tokens_limit:
            raise RequestError(
                f"{contract.MAX_TOKENS} is {max_tokens}; this model allows at most {limits.max_new_tokens_limit}"
            )
        if max_tokens > remaining:
            raise RequestError(
                f"{contract.MAX_TOKENS} is {max_tokens} but only {remaining} tokens of the {limits.context_length}"
                f"-token context remain after the {prompt_len}-token prompt"
            )
    else:
        max_tokens = min(remaining, limits.max_new_tokens_limit)

    temperature = float(_scalar(contract.TEMPERATURE, values.get(contract.TEMPERATURE, contract.DEFAULT_TEMPERATURE),
                                "float"))
    if temperature < 0:
        raise RequestError(f"{contract.TEMPERATURE} must be >= 0 (0 is greedy), got {temperature}")
    top_p = float(_scalar(contract.TOP_P, values.get(contract.TOP_P, contract.DEFAULT_TOP_P), "float"))
    if not 0 < top_p <= 1:
        raise RequestError(f"{contract.TOP_P} must be in (0, 1], got {top_p}")
    top_k = int(_scalar(contract.TOP_K, values.get(contract.TOP_K, contract.DEFAULT_TOP_K), "int"))
    if top_k < 0:
        raise RequestError(f"{contract.TOP_K} must be >= 0 (0 disables it), got {top_k}")
    seed = int(_scalar(contract.SEED, values[contract.SEED], "int")) if contract.SEED in values else None
    if seed is not None and seed < 0:
        raise RequestError(f"{contract.SEED} must be >= 0, got {seed}")
    penalty = float(_scalar(contract.REPETITION_PENALTY,
                            values.get(contract.REPETITION_PENALTY, contract.DEFAULT_REPETITION_PENALTY), "float"))
    if penalty <= 0:
        raise RequestError(f"{contract.REPETITION_PENALTY} must be > 0 (1 disables it), got {penalty}")

    ignore_eos = contract.DEFAULT_IGNORE_EOS
    if contract.IGNORE_EOS in values:
        flag = np.asarray(values[contract.IGNORE_EOS]).reshape(-1)
        if flag.dtype.kind != "b" or flag.size != 1:
            raise RequestError(f"{contract.IGNORE_EOS} must be a single BOOL, got {flag.size} {flag.dtype} value(s)")
        ignore_eos = bool(flag[0])
    stops = set() if ignore_eos else set(limits.stop_token_ids)
    if contract.STOP_TOKEN_IDS in values:
        extra = _int_values(contract.STOP_TOKEN_IDS, values[contract.STOP_TOKEN_IDS])
        bad = extra[(extra < 0) | (extra >= limits.vocab_size)]
        if bad.size:
            raise RequestError(
                f"{contract.STOP_TOKEN_IDS} has id {int(bad[0])} outside the vocabulary [0, {limits.vocab_size})"
            )
        stops.update(int(t) for t in extra)

    return GenerationRequest(
        prompt_ids=[int(t) for t in ids],
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature, top_p, top_k, seed, penalty),
        stop_token_ids=frozenset(stops),
        grammar=_grammar(values[contract.GRAMMAR]) if contract.GRAMMAR in values else None,
        logprobs=_top_count(contract.LOGPROBS, values),
        prompt_logprobs=_top_count(contract.PROMPT_LOGPROBS, values),
    )


def _grammar(value: Any) -> bytes:
    arr = np.asarray(value, dtype=object).reshape(-1)
    if arr.size != 1:
        raise RequestError(f"{contract.GRAMMAR} must be a single BYTES value, got {arr.size} values")
    item = arr[0]
    data = item.encode() if isinstance(item, str) else item
    if not isinstance(data, bytes) or not data:
        raise RequestError(f"{contract.GRAMMAR} must be a non-empty JSON document (BYTES)")
    if len(data) > MAX_GRAMMAR_BYTES:
        raise RequestError(f"{contract.GRAMMAR} is {len(data)} bytes; at most {MAX_GRAMMAR_BYTES} are accepted")
    return data


def _top_count(name: str, values: Mapping[str, Any]) -> int | None:
    if name not in values:
        return None
    count = int(_scalar(name, values[name], "int"))
    if not 0 <= count <= contract.MAX_TOP_LOGPROBS:
        raise RequestError(f"{name} must be in [0, {contract.MAX_TOP_LOGPROBS}] (alternatives per token), got {count}")
    return count


def unbatch(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Drop the leading batch dimension of 1 every generation-model input carries (max_batch_size > 0)."""
    out: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        arr = np.asarray(value)
        if arr.ndim == 0:
            raise RequestError(f"{name} must have a batch dimension of 1, got a scalar")
        if arr.shape[0] != 1:
            raise RequestError(f"{name} has batch dimension {arr.shape[0]}; send one sequence per request (batch 1)")
        out[name] = arr[0]
    return out
