"""The decode batch's KV cache: every active sequence right-aligned in one padded batch.

Sequences have different lengths, so each row is left-padded to the longest and an attention mask
hides the padding; positions are per row (its own real length), so a sequence decodes exactly as
it would alone. The optimum graph concatenates the past with the new token internally, so the
cache after a step is simply the graph's ``present`` outputs: no copy on our side in steady state.
Rows are copied only when the membership changes: new sequences join after their prefill, finished
ones are dropped and leading columns no live row uses are trimmed, so the padded length stays the
longest live sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BatchKV:
    """Right-aligned KV cache of the active rows, with its attention mask and real lengths."""

    def __init__(self) -> None:
        self.past: list[np.ndarray] = []
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.lengths = np.zeros(0, dtype=np.int64)

    def clear(self) -> None:
        self.past = []
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.lengths = np.zeros(0, dtype=np.int64)

    @property
    def rows(self) -> int:
        return int(self.lengths.size)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.past))

    def add(self, past: Sequence[np.ndarray], mask: np.ndarray) -> None:
        """Append rows from a (left-padded) prefill: ``past`` arrays [n, heads, len, dim], ``mask`` [n, len]."""
        n, new_width = mask.shape
        if self.rows == 0:
            self.past = [np.ascontiguousarray(p) for p in past]
            self.mask = mask.astype(np.int64, copy=True)
            self.lengths = mask.sum(axis=1).astype(np.int64)
            self._trim()
            return
        width = max(self.width, new_width)
        total = self.rows + n
        merged = []
        for old, new in zip(self.past, past, strict=True):
            heads, dim = old.shape[1], old.shape[3]
            out = np.zeros((total, heads, width, dim), dtype=old.dtype)
            out[: self.rows, :, width - self.width:] = old
            out[self.rows:, :, width - new_width:] = new
            merged.append(out)
        full_mask = np.zeros((total, width), dtype=np.int64)
        full_mask[: self.rows, width - self.width:] = self.mask
        full_mask[self.rows:, width - new_width:] = mask
        self.past = merged
        self.mask = full_mask
        self.lengths = np.concatenate([self.lengths, mask.sum(axis=1).astype(np.int64)])
        self._trim()

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); drop the others and trim the padding nobody needs."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.clear()
            return
        index = np.asarray(rows, dtype=np.int64)
        self.mask = self.mask[index]
        self.lengths = self.lengths[index]
        pad = self.width - int(self.lengths.max())
        self.past = [np.ascontiguousarray(p[index, :, pad:]) for p in self.past]
        self.mask = np.ascontiguousarray(self.mask[:, pad:])

    def _trim(self) -> None:
        pad = self.width - int(self.lengths.max())
        if pad > 0:
            self.past = [np.ascontiguousarray(p[:, :, pad:]) for p in self.past]
            self.mask = np.ascontiguousarray(self.mask[:, pad:])

    def step_inputs(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids [rows, 1], attention_mask [rows, width + 1] and position_ids [rows, 1] of a decode step."""
        ids = tokens.reshape(-1, 1).astype(np.int64)
        mask = np.concatenate([self.mask, np.ones((self.rows, 1), dtype=np.int64)], axis=1)
        positions = self.lengths.reshape(-1, 1).copy()
        return ids, mask, positions

    def advance(self, present: list[np.ndarray], mask: np.ndarray) -> None:
        """Take the step's outputs as the new cache (each row one token longer)."""
        self.past = present
        self.mask = mask
        self.lengths = self.lengths + 1


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded input_ids, attention_mask and position_ids of a prefill batch."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions
