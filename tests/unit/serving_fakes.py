"""A tiny deterministic numpy "causal LM" with a real KV-cache contract, for scheduler tests.

Each position's key is ``embedding[token] + position_embedding[position]``; the output at a position is
a projection of the masked mean of every key it may attend to. Mishandled padding, positions or
cache rows change the logits, so equality with single-sequence decoding is a meaningful check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from toolkit.runtime.logprobs import Logprobs


class FakeRunner:
    num_layers = 1
    num_kv_heads = 1
    head_dim = 8
    dtype = np.float32

    def __init__(self, vocab_size: int = 40, max_positions: int = 256, seed: int = 0, spare_columns: int = 0):
        rng = np.random.default_rng(seed)
        self.kv_spare_columns = spare_columns  # > 0: present is the new tokens only, like the split-KV graph
        self.vocab_size = vocab_size
        self.embed = rng.normal(size=(vocab_size, self.head_dim)).astype(np.float32)
        self.pos = rng.normal(size=(max_positions, self.head_dim)).astype(np.float32)
        self.out = rng.normal(size=(self.head_dim, vocab_size)).astype(np.float32) * 3
        self.calls: list[tuple[int, int]] = []  # (batch, new tokens) of every forward
        self.fail_next = False

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, 1, 0, self.head_dim), np.float32) for _ in range(2)]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: Sequence[np.ndarray], all_logits: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        batch, seq = input_ids.shape
        self.calls.append((batch, seq))
        new = (self.embed[input_ids] + self.pos[position_ids])[:, None]  # [B, 1, S, D]
        keys = np.concatenate([past[0], new], axis=2)
        total = keys.shape[2]
        assert attention_mask.shape == (batch, total), (attention_mask.shape, total)
        logits = np.zeros((batch, seq, self.vocab_size), np.float32)
        for s in range(seq):
            upto = total - seq + s + 1
            weights = attention_mask[:, :upto].astype(np.float32)
            hidden = (keys[:, 0, :upto] * weights[..., None]).sum(1) / np.maximum(weights.sum(1, keepdims=True), 1)
            logits[:, s] = np.tanh(hidden) @ self.out
        present = new if self.kv_spare_columns else keys
        return logits, [present, present.copy()]


def reference_greedy(runner: FakeRunner, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
    """Single-sequence greedy without any batching: the ground truth."""
    ids = np.asarray([prompt])
    mask = np.ones_like(ids)
    pos = np.arange(len(prompt))[None]
    past = runner.empty_past(1)
    out: list[int] = []
    for _ in range(max_new):
        logits, present = runner.forward(ids, mask, pos, past)
        past = [np.concatenate([p, n], axis=2) for p, n in zip(past, present, strict=True)] \
            if runner.kv_spare_columns else present
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        out.append(token)
        ids = np.asarray([[token]])
        pos = pos[:, -1:] + 1
        mask = np.ones((1, past[0].shape[2] + 1), np.int64)
    return out


class RecordingStream:
    def __init__(self, cancel_after: int | None = None):
        self.tokens: list[int] = []
        self.finish: tuple[str, int, int] | None = None
        self.error: str | None = None
        self.cancel_after = cancel_after
        self.cancel = False
        self.logprobs: list[Logprobs] = []
        self.prompt_logprobs: Logprobs | None = None

    def on_tokens(self, ids: list[int], logprobs: Logprobs | None = None,
                  prompt_logprobs: Logprobs | None = None) -> None:
        assert prompt_logprobs is None or (self.prompt_logprobs is None and not self.tokens), "prompt logprobs late"
        self.tokens.extend(ids)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        if prompt_logprobs is not None:
            self.prompt_logprobs = prompt_logprobs

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        assert self.finish is None and self.error is None, "finished twice"
        self.finish = (reason, prompt_tokens, completion_tokens)

    def on_error(self, message: str) -> None:
        assert self.finish is None and self.error is None, "finished twice"
        self.error = message

    def is_cancelled(self) -> bool:
        return self.cancel or (self.cancel_after is not None and len(self.tokens) >= self.cancel_after)

    @property
    def done(self) -> bool:
        return self.finish is not None or self.error is not None
