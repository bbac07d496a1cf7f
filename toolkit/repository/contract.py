"""The tensor contract of the repository's models, as tables: one source for every name, type and default.

The generation model is a python-backend, decoupled model with ``max_batch_size > 0``, so every
tensor in :data:`GENERATION_INPUTS` and :data:`GENERATION_OUTPUTS` has a leading batch dimension of 1
per request (Triton's dynamic batcher may hand the model several requests at once; ``input_ids``
allows ragged batching). The Triton config builder (:mod:`toolkit.repository.pbtxt`), the request
encoder of the gateway and of the Python client (:func:`request_arrays`) and the generation model's
request validation all read these tables.

One streamed response per decode step carries OUTPUT_IDS (the new token ids of that step, usually
one) with an empty FINISH_REASON; the last response (sent with the final flag) carries
FINISH_REASON in {"stop", "length", "cancelled"} and the token counts. An invalid request gets an
error response with the final flag, never silence.

A core model (``<name>_onnx_fp32`` ...) is one forward pass of the KV-cache graph; its tensors
(:func:`core_inputs`, :func:`core_outputs`) are those of optimum's ``text-generation-with-past``
export, named here once. numpy and the standard library only: this runs inside Triton's python
backend, and the gateway imports it without the build stack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from toolkit.errors import StageError


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model: its Triton wire type, its dims after the batch dim (-1: variable)."""

    name: str
    dtype: str  # Triton's wire name: INT64, INT32, FP32, FP16, BOOL, BYTES
    shape: tuple[int, ...]
    optional: bool = False
    ragged: bool = False  # the dynamic batcher may batch requests of different lengths

    @property
    def config_type(self) -> str:
        """The ``config.pbtxt`` data type (BYTES on the wire is TYPE_STRING in a config)."""
        return "TYPE_STRING" if self.dtype == "BYTES" else f"TYPE_{self.dtype}"

    @property
    def numpy_dtype(self) -> Any:
        return _NUMPY[self.dtype]


_NUMPY: dict[str, Any] = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP16": np.float16,
                          "BOOL": np.bool_, "BYTES": np.object_}

# ---------------------------------------------------------------- the generation model

INPUT_IDS = "input_ids"
MAX_TOKENS = "max_tokens"
TEMPERATURE = "temperature"
TOP_P = "top_p"
TOP_K = "top_k"
SEED = "seed"
REPETITION_PENALTY = "repetition_penalty"
STOP_TOKEN_IDS = "stop_token_ids"
IGNORE_EOS = "ignore_eos"
GRAMMAR = "grammar"  # a JSON grammar spec (toolkit.runtime.grammar): every token is masked to follow it
LOGPROBS = "logprobs"  # k >= 0: each generated token's log-probability, and the k most likely alternatives
PROMPT_LOGPROBS = "prompt_logprobs"  # k >= 0: the same for every prompt token (from the first on)

# How the generation model's error messages start, so a client can tell whose fault an error is:
# a request it refused (the client's), a full queue (retry), a shutdown (another instance); any other
# error is the server's.
INVALID_REQUEST_PREFIX = "invalid request: "
SERVER_BUSY_PREFIX = "server busy: "
SHUTTING_DOWN_PREFIX = "shutting down: "

OUTPUT_IDS = "output_ids"
FINISH_REASON = "finish_reason"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
# With LOGPROBS: per streamed response, one log-probability per OUTPUT_IDS token, and k alternatives per
# token, row-major (ids and their log-probabilities). With PROMPT_LOGPROBS: the first response carries the
# prompt's (NaN for the first prompt token, which has no context).
TOKEN_LOGPROBS = "token_logprobs"
TOP_LOGPROB_IDS = "top_logprob_ids"
TOP_LOGPROBS = "top_logprobs"
PROMPT_TOKEN_LOGPROBS = "prompt_token_logprobs"
PROMPT_TOP_LOGPROB_IDS = "prompt_top_logprob_ids"
PROMPT_TOP_LOGPROBS = "prompt_top_logprobs"
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs

# What an optional input left out means. MAX_TOKENS has none: it defaults to the rest of the context.
DEFAULT_TEMPERATURE = 0.0  # greedy
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0  # disabled
DEFAULT_REPETITION_PENALTY = 1.0  # disabled
DEFAULT_IGNORE_EOS = False  # true: only stop_token_ids end the reply, not the manifest's (benchmarks)

GENERATION_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec(INPUT_IDS, "INT64", (-1,), ragged=True),
    TensorSpec(MAX_TOKENS, "INT32", (1,), optional=True),
    TensorSpec(TEMPERATURE, "FP32", (1,), optional=True),
    TensorSpec(TOP_P, "FP32", (1,), optional=True),
    TensorSpec(TOP_K, "INT32", (1,), optional=True),
    TensorSpec(SEED, "INT64", (1,), optional=True),
    TensorSpec(REPETITION_PENALTY, "FP32", (1,), optional=True),
    TensorSpec(STOP_TOKEN_IDS, "INT64", (-1,), optional=True, ragged=True),  # added to the manifest's stop ids
    TensorSpec(IGNORE_EOS, "BOOL", (1,), optional=True),
    TensorSpec(GRAMMAR, "BYTES", (1,), optional=True),
    TensorSpec(LOGPROBS, "INT32", (1,), optional=True),
    TensorSpec(PROMPT_LOGPROBS, "INT32", (1,), optional=True),
)
GENERATION_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec(OUTPUT_IDS, "INT64", (-1,)),
    TensorSpec(FINISH_REASON, "BYTES", (1,)),  # "" until the final response
    TensorSpec(PROMPT_TOKENS, "INT32", (1,)),
    TensorSpec(COMPLETION_TOKENS, "INT32", (1,)),
    TensorSpec(TOKEN_LOGPROBS, "FP32", (-1,)),
    TensorSpec(TOP_LOGPROB_IDS, "INT64", (-1,)),
    TensorSpec(TOP_LOGPROBS, "FP32", (-1,)),
    TensorSpec(PROMPT_TOKEN_LOGPROBS, "FP32", (-1,)),
    TensorSpec(PROMPT_TOP_LOGPROB_IDS, "INT64", (-1,)),
    TensorSpec(PROMPT_TOP_LOGPROBS, "FP32", (-1,)),
)
OPTIONAL_INPUTS = tuple(spec.name for spec in GENERATION_INPUTS if spec.optional)
_INPUT_SPECS = {spec.name: spec for spec in GENERATION_INPUTS}

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"

# Every repository model has a CONFIG_FILE; the generation model's `parameters` (string values) are
# read by model.py at initialize. The manifest is at <model dir>/<version>/manifest.json; the tokenizer
# beside it.
CONFIG_FILE = "config.pbtxt"
PARAM_CORE_MODEL = "core_model"  # repository model whose weights run the forward pass, e.g. NAME_onnx_fp32
PARAM_RUNNER = "runner"  # "onnxruntime" (in-process, loads <repo>/<core_model>/<version>/model.onnx) or "bls"
PARAM_MAX_ACTIVE = "max_active_sequences"
PARAM_MAX_QUEUE = "max_queue"
PARAM_MAX_NEW_TOKENS = "max_new_tokens_limit"
PARAM_CORE_MAX_BATCH = "core_max_batch_size"  # optional: overrides the core model config's max_batch_size
PARAM_GRAMMAR_TIMEOUT = "grammar_compile_timeout_s"  # a grammar compiling longer is refused
RUNNER_ONNXRUNTIME = "onnxruntime"
RUNNER_BLS = "bls"
# The limits' values and defaults: toolkit.repository.spec.GenerationLimits. The context length is the
# manifest's (one place); repositories written by earlier toolkits also have a context_length parameter,
# which nothing reads any more.


def input_spec(name: str) -> TensorSpec:
    """The generation model's input `name`; a KeyError names the accepted inputs."""
    try:
        return _INPUT_SPECS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a generation model input; inputs: {', '.join(_INPUT_SPECS)}") from None


def request_arrays(prompt_ids: Sequence[int], **values: Any) -> dict[str, np.ndarray]:
    """The generation model's input arrays for one request, each with the batch dimension of 1.

    `values` are optional inputs by name; a value of None is left out (the model then applies the
    default above). A scalar input gets shape [1, 1], a list input [1, n].
    """
    arrays = {INPUT_IDS: np.asarray([list(prompt_ids)], dtype=input_spec(INPUT_IDS).numpy_dtype)}
    for name, value in values.items():
        spec = input_spec(name)
        if value is None:
            continue
        if spec.dtype == "BYTES" and isinstance(value, str):
            value = value.encode()
        row = list(value) if spec.shape == (-1,) else [value]
        arrays[name] = np.asarray([row], dtype=spec.numpy_dtype)
    return arrays


# ---------------------------------------------------------------- the core (KV-cache) models

ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
_PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.key$")


def past_names(num_layers: int) -> list[str]:
    """The KV-cache inputs, key then value per layer: the order runners pass them in."""
    return [f"past_key_values.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """The KV-cache outputs, in the order of :func:`past_names`."""
    return [f"present.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def past_layers(names: Iterable[str]) -> list[int]:
    """The layer numbers of the past-key inputs among `names`, sorted (a graph's KV layout)."""
    return sorted(int(m.group(1)) for name in names if (m := _PAST_KEY.match(name)))


def is_past(name: str) -> bool:
    return name.startswith("past_key_values.")


@dataclass(frozen=True)
class LMInfo:
    """Shape facts of a KV-cache causal LM graph: what its core-model tensors are."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: Literal["fp32", "fp16"] = "fp32"

    @classmethod
    def from_hf_config(cls, model_dir: Path) -> LMInfo:
        """Read layers, kv heads, head dim and vocab from a Hugging Face ``config.json``."""
        path = model_dir / "config.json"
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StageError(f"{path} not found: need the merged model's config.json") from None
        heads = int(cfg["num_attention_heads"])
        return cls(
            num_layers=int(cfg["num_hidden_layers"]),
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            vocab_size=int(cfg["vocab_size"]),
        )

    @classmethod
    def from_onnx(cls, path: Path) -> LMInfo:
        """Read the same facts from an exported graph's inputs and outputs (weights are not loaded)."""
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        inputs = {i.name: i for i in graph.input}
        layers = past_layers(inputs)
        if not layers:
            raise StageError(f"{path}: no past_key_values inputs; export with task text-generation-with-past")
        first = inputs[past_names(1)[0]].type.tensor_type
        dims = [d.dim_value for d in first.shape.dim]
        logits = graph.output[0].type.tensor_type.shape.dim
        return cls(
            num_layers=len(layers),
            num_kv_heads=int(dims[1]),
            head_dim=int(dims[3]),
            vocab_size=int(logits[-1].dim_value),
            kv_dtype="fp16" if first.elem_type == onnx.TensorProto.FLOAT16 else "fp32",
        )

    def past_names(self) -> list[str]:
        return past_names(self.num_layers)

    def present_names(self) -> list[str]:
        return present_names(self.num_layers)


def core_inputs(lm: LMInfo) -> list[TensorSpec]:
    """A core model's inputs, in the graph's order; KV tensors in the graph's own float type."""
    kv = "FP16" if lm.kv_dtype == "fp16" else "FP32"
    kv_shape = (lm.num_kv_heads, -1, lm.head_dim)
    return ([TensorSpec(name, "INT64", (-1,)) for name in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)]
            + [TensorSpec(name, kv, kv_shape) for name in lm.past_names()])


def core_outputs(lm: LMInfo) -> list[TensorSpec]:
    """A core model's outputs: logits [seq, vocab] and the new KV cache."""
    kv = "FP16" if lm.kv_dtype == "fp16" else "FP32"
    kv_shape = (lm.num_kv_heads, -1, lm.head_dim)
    return [TensorSpec(LOGITS, kv, (-1, lm.vocab_size))] + [TensorSpec(name, kv, kv_shape) for name in
                                                             lm.present_names()]
