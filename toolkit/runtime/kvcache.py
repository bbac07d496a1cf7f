"""The decode batch's KV cache: every active sequence right-aligned in one padded batch.

Sequences have different lengths, so each row is left-padded to the longest and an attention mask
hides the padding; positions are per row (its own real length), so a sequence decodes exactly as
it would alone. With the exported graph (optimum's interface) the cache after a step is the graph's
``present`` outputs (the graph concatenates past and new token, a copy of the whole cache each
step); with the serving graph of :mod:`toolkit.runtime.decode_graph` it is a buffer with spare
columns that each step writes one column of, in place. Rows are copied only when the membership
changes (new sequences join after their prefill, finished ones are dropped and leading columns no
live row uses are trimmed, so the padded length stays the longest live sequence) and, with spare
columns, when they run out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BatchKV:
    """Right-aligned KV cache of the active rows, with its attention mask and real lengths.

    ``spare_columns=0`` (a graph whose ``present`` is the whole cache): each step's outputs become the
    cache. ``spare_columns=n`` (:mod:`toolkit.runtime.decode_graph`'s graph, whose ``present`` is the new
    token only): the cache lives in buffers ``n`` columns wider than needed, the graph reads them whole
    (the spare columns masked out), and each step's new column is written in place; the buffers are
    reallocated only when the spare columns run out, once every ``n`` steps.
    """

    def __init__(self, spare_columns: int = 0) -> None:
        self.spare_columns = max(0, spare_columns)
        self.clear()

    def clear(self) -> None:
        self.buffers: list[np.ndarray] = []  # [rows, heads, capacity, dim]; columns [0, width) hold the cache
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.lengths = np.zeros(0, dtype=np.int64)

    @property
    def rows(self) -> int:
        return int(self.lengths.size)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def capacity(self) -> int:
        return int(self.buffers[0].shape[2]) if self.buffers else 0

    @property
    def past(self) -> list[np.ndarray]:
        """What the graph reads: the buffers whole (their spare columns masked by :meth:`step_inputs`)."""
        return self.buffers

    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.buffers))

    def add(self, past: Sequence[np.ndarray], mask: np.ndarray) -> None:
        """Append rows from a (left-padded) prefill: ``past`` arrays [n, heads, len, dim], ``mask`` [n, len]."""
        old_rows, old_width = self.rows, self.width
        new_rows, new_width = mask.shape
        width = max(old_width, new_width)
        full_mask = np.zeros((old_rows + new_rows, width), dtype=np.int64)
        full_mask[:old_rows, width - old_width:] = self.mask
        full_mask[old_rows:, width - new_width:] = mask
        lengths = np.concatenate([self.lengths, mask.sum(axis=1).astype(np.int64)])
        pad = width - int(lengths.max())  # leading columns no row uses
        merged = []
        for index, new in enumerate(past):
            heads, dim = new.shape[1], new.shape[3]
            out = np.zeros((old_rows + new_rows, heads, width - pad + self.spare_columns, dim), dtype=new.dtype)
            parts = [(slice(old_rows, None), new, new_width)]
            if old_rows:
                parts.append((slice(0, old_rows), self.buffers[index], old_width))
            for rows, cache, cache_width in parts:
                skip = max(0, pad - (width - cache_width))  # this part's own leading padding that is trimmed
                start = width - cache_width + skip - pad
                out[rows, :, start:width - pad] = cache[:, :, skip:cache_width]
            merged.append(out)
        self.buffers, self.mask, self.lengths = merged, np.ascontiguousarray(full_mask[:, pad:]), lengths

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); drop the others and trim the padding nobody needs."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.clear()
            return
        index = np.asarray(rows, dtype=np.int64)
        width = self.width
        self.lengths = self.lengths[index]
        pad = width - int(self.lengths.max())
        self.mask = np.ascontiguousarray(self.mask[index, pad:])
        self.buffers = [self._resized(b[index, :, pad:width]) for b in self.buffers]

    def _resized(self, cache: np.ndarray) -> np.ndarray:
        """A buffer holding `cache` ([rows, heads, width, dim]) with this cache's spare columns."""
        if not self.spare_columns:
            return np.ascontiguousarray(cache)
        rows, heads, width, dim = cache.shape
        out = np.empty((rows, heads, width + self.spare_columns, dim), dtype=cache.dtype)
        out[:, :, :width] = cache
        out[:, :, width:] = 0
        return out

    def step_inputs(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids [rows, 1], attention_mask [rows, capacity + 1] and position_ids [rows, 1] of a decode step."""
        ids = tokens.reshape(-1, 1).astype(np.int64)
        mask = np.zeros((self.rows, self.capacity + 1), dtype=np.int64)
        mask[:, : self.width] = self.mask
        mask[:, -1] = 1
        positions = self.lengths.reshape(-1, 1).copy()
        return ids, mask, positions

    def advance(self, present: list[np.ndarray]) -> None:
        """Take a decode step's outputs into the cache (each row one token longer)."""
        width = self.width
        if not self.spare_columns:  # the graph's present is the whole cache, the new column included
            self.buffers = present
        else:
            if width >= self.capacity:
                self.buffers = [self._resized(b[:, :, :width]) for b in self.buffers]
            for buffer, new in zip(self.buffers, present, strict=True):
                buffer[:, :, width] = new[:, :, -1]
        self.mask = np.concatenate([self.mask, np.ones((self.rows, 1), dtype=np.int64)], axis=1)
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
