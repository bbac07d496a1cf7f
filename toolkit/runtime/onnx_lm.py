"""A causal LM exported to ONNX with a KV cache, driven by onnxruntime. numpy only: no torch.

Used by the fidelity gates and by the serving runner inside Triton's python backend. The graph is
the one optimum exports for ``text-generation-with-past``: inputs ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.N.key/value`` ([batch, kv_heads, past, head_dim]); outputs
``logits`` and ``present.N.key/value`` (names: :mod:`toolkit.repository.contract`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from toolkit.repository.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, past_layers, past_names

PREFILL_TOKENS = 512  # prompt tokens (batch x positions) a prefill pass takes: bounds its all-position logits


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def record_greedy_step(next_ids: Sequence[int], stops: set[int], generated: list[list[int]], done: list[bool]) -> bool:
    """Append each unfinished row's next token to its completion; a stop id ends the row instead.

    The bookkeeping of every greedy loop here (onnxruntime and the PyTorch reference in
    toolkit.quality.fidelity), so they stop alike. Returns True once every row has ended.
    """
    for row, token in enumerate(next_ids):
        if done[row]:
            continue
        if token in stops:
            done[row] = True
        else:
            generated[row].append(int(token))
    return all(done)


class OnnxCausalLM:
    """One onnxruntime session over a KV-cache causal LM graph."""

    def __init__(self, path: Path | str, providers: Sequence[str] | None = None, threads: int | None = None,
                 spinning: bool | None = None, session_config: Mapping[str, str] | None = None,
                 graph: bytes | None = None):
        """``spinning``: whether idle intra-op threads busy-wait for work (onnxruntime's default: yes).

        ``session_config``: extra onnxruntime session config entries (``add_session_config_entry``);
        ``graph``: a serialized graph to run instead of the file at `path` (which names it); its external
        data, if any, is read from `path`'s folder.
        """
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        elif os.environ.get("OMP_NUM_THREADS"):
            options.intra_op_num_threads = int(os.environ["OMP_NUM_THREADS"])
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if graph is not None:  # a graph from memory has no folder of its own for its external data
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(path).parent))
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        self.path = Path(path)
        self.session = ort.InferenceSession(graph if graph is not None else str(path), options,
                                            providers=list(providers or default_providers()))
        inputs = {i.name: i for i in self.session.get_inputs()}
        # Inputs with a default (an initializer of the same name) are listed apart; they may be fed too.
        self.input_names = set(inputs) | {i.name for i in self.session.get_overridable_initializers()}
        layers = past_layers(inputs)
        if not layers:
            raise ValueError(f"{path}: no past_key_values inputs; export with task text-generation-with-past")
        self.num_layers = len(layers)
        self._past_names = past_names(len(layers))
        first = inputs[self._past_names[0]]
        self.num_kv_heads = int(first.shape[1])
        self.head_dim = int(first.shape[3])
        self.dtype = np.float16 if "float16" in first.type else np.float32
        self.has_position_ids = POSITION_IDS in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1])

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.dtype) for _ in range(2 * self.num_layers)]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence[np.ndarray],
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step. Returns logits [batch, seq, vocab] and the new KV cache (2 arrays a layer).

        ``extra``: more inputs of the graph (e.g. the serving graph's ``toolkit_logits_from``).
        """
        feed: dict[str, np.ndarray] = {
            INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64),
            ATTENTION_MASK: np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        if self.has_position_ids:
            feed[POSITION_IDS] = np.ascontiguousarray(position_ids, dtype=np.int64)
        feed.update(zip(self._past_names, past, strict=True))
        feed.update(extra or {})
        outputs = self.session.run(self.output_names, feed)
        return outputs[0], list(outputs[1:])

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
        max_tokens: int = PREFILL_TOKENS,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run a left-padded batch of prompts from an empty cache; return the last position's logits
        [batch, vocab] and the KV cache.

        The prompts go in chunks of at most `max_tokens` (batch x positions): the graph returns logits
        for every position, and one pass over a long batch would hold batch x length x vocabulary floats
        (a 483-token prompt at batch 8 and Gemma's 262,144 tokens: 4 GB a tensor, 10 GB at the peak).
        """
        batch, length = input_ids.shape
        step = max(1, max_tokens // max(1, batch))
        past = self.empty_past(batch)
        logits = np.empty((batch, 0, self.vocab_size), dtype=np.float32)
        for start in range(0, length, step):
            end = min(length, start + step)
            logits, past = self.forward(input_ids[:, start:end], attention_mask[:, :end], position_ids[:, start:end],
                                        past)
        return logits[:, -1, :], past

    def sequence_logits(self, ids: Sequence[int], max_tokens: int | None = None,
                        ) -> Iterator[tuple[int, np.ndarray]]:
        """One sequence's logits at every position, in chunks of at most `max_tokens` positions through the
        KV cache: yields (first position, logits [positions, vocab]) so a caller scoring a long sequence never
        holds all of them."""
        arr = np.asarray([list(ids)], dtype=np.int64)
        past = self.empty_past(1)
        step = max_tokens or PREFILL_TOKENS
        for start in range(0, arr.shape[1], step):
            end = min(arr.shape[1], start + step)
            logits, past = self.forward(arr[:, start:end], np.ones((1, end), dtype=np.int64),
                                        np.arange(start, end)[None, :], past)
            yield start, logits[0]

    def greedy(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_ids: Sequence[int],
        pad_id: int = 0,
        return_logits: bool = False,
    ) -> tuple[list[list[int]], list[np.ndarray]]:
        """Greedy decoding of a left-padded batch.

        Returns each prompt's generated ids, without the stop token that ended it, and (when
        asked) each step's last-position logits [batch, vocab] for comparison with PyTorch.
        """
        from toolkit.runtime.kvcache import left_pad

        batch = len(prompts)
        ids, mask, positions = left_pad(prompts, pad_id)
        stops = set(stop_ids)
        generated: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        step_logits: list[np.ndarray] = []
        last, past = self.prefill(ids, mask, positions)
        step_ids, step_pos = ids, positions
        for step in range(max_new_tokens):
            if step:
                logits, past = self.forward(step_ids, mask, step_pos, past)
                last = logits[:, -1, :]
            if return_logits:
                step_logits.append(last.astype(np.float32))
            next_ids = last.argmax(axis=-1)
            if record_greedy_step(next_ids.tolist(), stops, generated, done):
                break
            step_ids = next_ids[:, None].astype(np.int64)
            step_pos = step_pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        return generated, step_logits
