"""Per-request token sampling and stop logic: plain numpy, one instance per sequence.

Greedy (temperature 0) is a plain argmax, so served greedy output equals the direct ONNX greedy
loop token for token. Otherwise: repetition penalty (the Hugging Face rule), temperature, top-k,
top-p, then a draw from the request's own seeded generator, so a seeded request is reproducible
whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolkit.repository import contract
from toolkit.runtime.requests import GenerationRequest, SamplingParams


class Sampler:
    """Draws the next token of one sequence from its last-position logits."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        # Tokens already seen, for the repetition penalty (prompt and generated alike, as in HF).
        self._seen = np.zeros(0, dtype=np.int64)
        if params.repetition_penalty != 1.0:
            self._seen = np.unique(np.asarray(prompt_ids, dtype=np.int64))

    def observe(self, token: int) -> None:
        """Record a generated token (only the repetition penalty needs the history)."""
        if self.params.repetition_penalty != 1.0 and token not in self._seen:
            self._seen = np.append(self._seen, token)

    def penalised(self, logits: np.ndarray) -> np.ndarray:
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or self._seen.size == 0:
            return logits
        out = logits.astype(np.float32, copy=True)
        picked = out[self._seen]
        out[self._seen] = np.where(picked > 0, picked / penalty, picked * penalty)
        return out

    def sample(self, logits: np.ndarray) -> int:
        """The next token id from a 1-D logits row."""
        scores = self.penalised(logits)
        params = self.params
        if params.greedy:
            return int(np.argmax(scores))
        scores = scores.astype(np.float64) / params.temperature
        if params.top_k and params.top_k < scores.size:
            kth = np.partition(scores, -params.top_k)[-params.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if params.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            keep = int(np.searchsorted(cumulative, params.top_p) + 1)
            mask = np.zeros_like(probs)
            mask[order[:keep]] = 1.0
            probs = probs * mask
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


@dataclass
class StopState:
    """Decides when a sequence ends: a stop token, its max_tokens, or the context."""

    stop_token_ids: frozenset[int]
    max_tokens: int
    generated: int = 0
    finish_reason: str | None = None

    def accept(self, token: int) -> bool:
        """Account for a sampled token; True if it should be streamed (stop tokens are not)."""
        if token in self.stop_token_ids:
            self.finish_reason = contract.FINISH_STOP
            return False
        self.generated += 1
        if self.generated >= self.max_tokens:
            self.finish_reason = contract.FINISH_LENGTH
        return True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def make_sampler(request: GenerationRequest) -> tuple[Sampler, StopState]:
    """The sampler and stop state of a validated request."""
    return Sampler(request.sampling, request.prompt_ids), StopState(request.stop_token_ids, request.max_tokens)
