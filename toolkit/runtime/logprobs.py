"""Log-probabilities of chosen tokens and their most likely alternatives, from logits rows. numpy only.

What they are log-probabilities *of* (vLLM's default, ``raw_logprobs``): the log-softmax of the model's
logits after the request's grammar mask, before repetition penalty, temperature, top-k and top-p.
The grammar is part of the distribution a token is drawn from (a token it forbids has probability 0,
so alternatives are only tokens the grammar allows); the sampling knobs are not, so the same token
has the same log-probability at any temperature, and greedy prompt scoring (evaluation harnesses)
reads the model itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Logprobs:
    """For n tokens: each one's log-probability [n], and its k best alternatives [n, k] (ids, log-probabilities)."""

    token: np.ndarray
    top_ids: np.ndarray
    top: np.ndarray

    def __len__(self) -> int:
        return int(self.token.size)


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (rows [n, vocab]; -inf logits stay -inf)."""
    scores = np.asarray(rows, dtype=np.float64)
    peak = scores.max(axis=-1, keepdims=True)
    shifted = scores - peak
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logprobs_of(rows: np.ndarray, tokens: Sequence[int], k: int) -> Logprobs:
    """The log-probability of ``tokens[i]`` under ``rows[i]``, and each row's `k` most likely tokens."""
    n = len(tokens)
    logp = log_softmax(rows.reshape(n, -1))
    index = np.asarray(tokens, dtype=np.int64)
    token = logp[np.arange(n), index].astype(np.float32)
    if k == 0 or n == 0:
        return Logprobs(token, np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32))
    vocab = logp.shape[1]
    k = min(k, vocab)
    part = np.argpartition(-logp, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(logp, part, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    top_ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top = np.take_along_axis(values, order, axis=1).astype(np.float32)
    return Logprobs(token, top_ids, top)


def prompt_logprobs(logits: np.ndarray, prompt: Sequence[int], k: int) -> Logprobs:
    """Prompt tokens' log-probabilities from a prefill's logits over the prompt (the row's last len(prompt)
    positions: the prompt is left-padded). The first token has none (NaN), as in OpenAI's ``echo``."""
    n = len(prompt)
    rows = np.zeros((n, logits.shape[-1]), dtype=np.float32)
    if n > 1:
        rows[1:] = logits[-n:-1]
    out = logprobs_of(rows, prompt, k)
    token = out.token.copy()
    token[0] = np.nan
    top_ids, top = out.top_ids.copy(), out.top.copy()
    top_ids[0] = -1
    top[0] = -np.inf
    return Logprobs(token, top_ids, top)
