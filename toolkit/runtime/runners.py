"""Forward-pass runners behind one interface: one KV-cache step of the causal LM over a batch.

``OnnxRunner`` (the embedded default) runs the exported ONNX graph in-process with onnxruntime (the
CUDA provider where the installed onnxruntime has it). ``BlsRunner`` sends the same step to the
repository's core model (``<name>_onnx_fp32``/``_onnx_int8`` onnxruntime_onnx or ``_trt_fp16``
tensorrt_plan) through Triton's business-logic scripting, for GPU deployments in NVIDIA's Triton
image; the scheduler does not know which one it drives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from toolkit.repository.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past_names, present_names
from toolkit.runtime.decode_graph import LOGITS_FROM, UnsupportedGraphError, split_kv_graph
from toolkit.runtime.onnx_lm import OnnxCausalLM


class Runner(Protocol):
    """One forward step: logits [batch, seq or 1, vocab] and the KV cache's new state (key, value per layer).

    ``kv_spare_columns`` 0: ``present`` is the whole cache (past and new tokens); n > 0: ``present`` is
    the new tokens only, and the graph reads past buffers with up to n masked spare columns.
    ``logits`` holds at least the last position; with ``all_logits`` every position of the input.
    """

    kv_spare_columns: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: Any

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Sequence[np.ndarray],
        all_logits: bool = False,
    ) -> tuple[np.ndarray, list[np.ndarray]]: ...

    def empty_past(self, batch: int) -> list[np.ndarray]: ...


SPARE_COLUMNS = 32  # the split-KV cache is reallocated once every this many decode steps


class OnnxRunner:
    """onnxruntime in the serving process (CPU, or CUDA where the provider is installed).

    It runs :mod:`toolkit.runtime.decode_graph`'s rewrite of the graph where it applies (batch 16,
    past 256, 2 cores: 71 -> 59 ms a decode step; a 16 x 80-token prefill 1444 -> 1289 ms), else the
    graph as exported; ``graph_note`` says which and why. ``TOOLKIT_SPLIT_KV=0`` forces the latter.

    Its intra-op threads do not busy-wait between operators (``spinning=False``; ``TOOLKIT_ORT_SPINNING=1``
    turns it back on). In a server they share the cores with everything else that serves a token
    (this thread's Python, the outbox, Triton's gRPC, the gateway, the client on a small machine), and
    a spinning thread both takes a core from them and, once preempted, stalls every parallel operator
    until it runs again. Measured on 2 cores, batch 16, past 200 (ms a decode step): 153 spinning vs
    128 not, alone; 185 vs 101 with one other busy process. Alone at batch 1 spinning is faster
    (25 vs 30 ms), so the bare single-stream loop is the one case it wins.
    """

    def __init__(self, path: Path | str, providers: Sequence[str] | None = None, threads: int | None = None,
                 spinning: bool | None = None, split_kv: bool | None = None):
        if spinning is None:
            spinning = os.environ.get("TOOLKIT_ORT_SPINNING", "0") == "1"
        if split_kv is None:
            split_kv = os.environ.get("TOOLKIT_SPLIT_KV", "1") != "0"
        graph: bytes | None = None
        self.graph_note = "the exported graph (TOOLKIT_SPLIT_KV=0)"
        if split_kv:
            try:
                graph = split_kv_graph(Path(path))
                self.graph_note = "the split-KV serving graph (no cache copy a step, last-position logits)"
            except UnsupportedGraphError as err:
                self.graph_note = f"the exported graph (no split-KV rewrite: {err})"
        # The split graph's present is the new tokens only: its cache keeps spare columns to write them into.
        self.kv_spare_columns = SPARE_COLUMNS if graph is not None else 0
        self.lm = OnnxCausalLM(path, providers=providers, threads=threads, spinning=spinning, graph=graph)
        del graph
        self.vocab_size = self.lm.vocab_size
        self.num_layers = self.lm.num_layers
        self.num_kv_heads = self.lm.num_kv_heads
        self.head_dim = self.lm.head_dim
        self.dtype = self.lm.dtype
        self.providers = self.lm.session.get_providers()

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Sequence[np.ndarray],
        all_logits: bool = False,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        # The exported graph returns every position's logits anyway; the serving graph when asked.
        extra = {LOGITS_FROM: np.zeros(1, dtype=np.int64)} if all_logits and LOGITS_FROM in self.lm.input_names \
            else None
        return self.lm.forward(input_ids, attention_mask, position_ids, past, extra)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return self.lm.empty_past(batch)


class BlsRunner:
    """The repository's core model called with ``pb_utils.InferenceRequest(...).exec()``.

    The core model has its own ``max_batch_size``; a larger decode batch is sent in chunks, one
    ``exec()`` after another. Only the marshalling is unit-tested here (fake ``pb_utils``): the pytriton
    server has no onnxruntime or tensorrt backend to call.
    """

    def __init__(
        self,
        pb_utils: Any,
        core_model: str,
        *,
        vocab_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_batch_size: int,
        dtype: Any = np.float32,
        has_position_ids: bool = True,
    ):
        self.pb_utils = pb_utils
        self.kv_spare_columns = 0  # the core model has the exported interface: present is the whole cache
        self.core_model = core_model
        self.vocab_size = vocab_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = np.dtype(dtype)
        self.max_batch_size = max(1, max_batch_size)
        self.has_position_ids = has_position_ids
        self._past_names = past_names(num_layers)
        self._outputs = [LOGITS, *present_names(num_layers)]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.dtype) for _ in range(2 * self.num_layers)]

    def build_request(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Sequence[np.ndarray]
    ) -> Any:
        """The InferenceRequest of one chunk (public so its marshalling can be unit-tested)."""
        tensor = self.pb_utils.Tensor
        inputs = [
            tensor(INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64)),
            tensor(ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64)),
        ]
        if self.has_position_ids:
            inputs.append(tensor(POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64)))
        inputs += [tensor(name, np.ascontiguousarray(arr, dtype=self.dtype)) for name, arr in zip(
            self._past_names, past, strict=True)]
        return self.pb_utils.InferenceRequest(
            model_name=self.core_model, requested_output_names=list(self._outputs), inputs=inputs
        )

    def parse_response(self, response: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        if response.has_error():
            raise RuntimeError(f"core model {self.core_model}: {response.error().message()}")
        arrays = []
        for name in self._outputs:
            out = self.pb_utils.get_output_tensor_by_name(response, name)
            if out is None:
                raise RuntimeError(f"core model {self.core_model} returned no {name}")
            arrays.append(out.as_numpy())
        return arrays[0], arrays[1:]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Sequence[np.ndarray],
        all_logits: bool = False,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The core model has the exported interface: its logits cover every position, `all_logits` or not."""
        batch = input_ids.shape[0]
        step = self.max_batch_size
        requests = [
            self.build_request(
                input_ids[lo:lo + step], attention_mask[lo:lo + step], position_ids[lo:lo + step],
                [p[lo:lo + step] for p in past],
            )
            for lo in range(0, batch, step)
        ]
        results = [self.parse_response(r.exec()) for r in requests]
        if len(results) == 1:
            return results[0]
        logits = np.concatenate([r[0] for r in results], axis=0)
        present = [np.concatenate([r[1][i] for r in results], axis=0) for i in range(2 * self.num_layers)]
        return logits, present
