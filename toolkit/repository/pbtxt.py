"""Triton ``config.pbtxt`` files, built from typed objects through Triton's own protobuf schema.

Every config is a ``model_config_pb2.ModelConfig`` message filled field by field and written with
``text_format``, never a string template: a wrong field name or data type fails here, at build
time, instead of when Triton loads the repository. :func:`validate_config` adds the checks Triton
itself makes at load time that the schema cannot express (preferred batch sizes within the max
batch size, a decoupled policy only on the python backend, unique tensor names, non-empty dims).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from toolkit.errors import ConfigError, StageError
from toolkit.repository import contract as c
from toolkit.workspace import atomic_write_text

CONFIG_FILE = "config.pbtxt"
InstanceKind = Literal["KIND_AUTO", "KIND_CPU", "KIND_GPU"]
_PAST = re.compile(r"^past_key_values\.(\d+)\.key$")


@dataclass(frozen=True)
class LMInfo:
    """Shape facts of a KV-cache causal LM graph: what its core-model config must declare."""

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
        layers = [int(m.group(1)) for name in inputs if (m := _PAST.match(name))]
        if not layers:
            raise StageError(f"{path}: no past_key_values inputs; export with task text-generation-with-past")
        first = inputs["past_key_values.0.key"].type.tensor_type
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
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]


def data_type(name: str) -> int:
    """The ``DataType`` enum value of `name` (e.g. ``TYPE_FP32``); an unknown name fails the build."""
    try:
        return int(pb.DataType.Value(name))
    except ValueError:
        raise ConfigError(f"unknown Triton data type {name!r}; valid: {', '.join(pb.DataType.keys()[1:])}") from None


def _tensor(
    message: pb.ModelInput | pb.ModelOutput, name: str, dtype: str, dims: Iterable[int]
) -> None:
    message.name = name
    message.data_type = data_type(dtype)
    message.dims.extend(dims)


def _add_input(
    config: pb.ModelConfig, name: str, dtype: str, dims: Iterable[int], *, optional: bool = False,
    ragged: bool = False,
) -> None:
    tensor = config.input.add()
    _tensor(tensor, name, dtype, dims)
    tensor.optional = optional
    tensor.allow_ragged_batch = ragged


def _add_output(config: pb.ModelConfig, name: str, dtype: str, dims: Iterable[int]) -> None:
    _tensor(config.output.add(), name, dtype, dims)


def _batching(
    config: pb.ModelConfig, max_batch_size: int, preferred_batch_sizes: Iterable[int], max_queue_delay_us: int,
    instance_count: int, kind: InstanceKind,
) -> None:
    config.max_batch_size = max_batch_size
    config.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    group = config.instance_group.add()
    group.count = instance_count
    group.kind = pb.ModelInstanceGroup.Kind.Value(kind)


def _lm_tensors(config: pb.ModelConfig, lm: LMInfo, *, kv_type: str, logits_type: str) -> None:
    # max_batch_size > 0: Triton adds the batch dim itself, so dims start after it.
    for name in ("input_ids", "attention_mask", "position_ids"):
        _add_input(config, name, "TYPE_INT64", [-1])
    kv_dims = [lm.num_kv_heads, -1, lm.head_dim]
    for name in lm.past_names():
        _add_input(config, name, kv_type, kv_dims)
    _add_output(config, "logits", logits_type, [-1, lm.vocab_size])
    for name in lm.present_names():
        _add_output(config, name, kv_type, kv_dims)


def onnx_core_config(
    name: str, lm_info: LMInfo, *, max_batch_size: int, preferred_batch_sizes: Iterable[int],
    max_queue_delay_us: int, instance_count: int, kind: InstanceKind = "KIND_AUTO",
) -> pb.ModelConfig:
    """An ``onnxruntime_onnx`` core model: one forward pass of the KV-cache graph."""
    return _core_config(pb.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime"), lm_info,
                        max_batch_size, preferred_batch_sizes, max_queue_delay_us, instance_count, kind)


def tensorrt_core_config(
    name: str, lm_info: LMInfo, *, max_batch_size: int, preferred_batch_sizes: Iterable[int],
    max_queue_delay_us: int, instance_count: int, kind: InstanceKind = "KIND_GPU",
) -> pb.ModelConfig:
    """A ``tensorrt_plan`` core model over a plan built by ``toolkit.repository.tensorrt``.

    The I/O types are the ONNX graph's, for FP16 and INT8 plans alike: ``--fp16``/``--int8`` only
    allow lower-precision kernels inside the engine, and trtexec binds every network input and
    output in its own type unless ``--inputIOFormats``/``--outputIOFormats`` say otherwise (its
    help: "default = all inputs in fp32:chw"), which the generated command does not. The int64
    token tensors stay int64: TensorRT 10 binds INT64 natively (8.x cast them to INT32).
    """
    return _core_config(pb.ModelConfig(name=name, platform="tensorrt_plan", backend="tensorrt"), lm_info,
                        max_batch_size, preferred_batch_sizes, max_queue_delay_us, instance_count, kind)


def _core_config(
    config: pb.ModelConfig, lm_info: LMInfo, max_batch_size: int, preferred_batch_sizes: Iterable[int],
    max_queue_delay_us: int, instance_count: int, kind: InstanceKind,
) -> pb.ModelConfig:
    """The KV-cache graph's tensors (in the graph's own types) and batching on a core model config."""
    dtype = "TYPE_FP16" if lm_info.kv_dtype == "fp16" else "TYPE_FP32"
    _lm_tensors(config, lm_info, kv_type=dtype, logits_type=dtype)
    _batching(config, max_batch_size, preferred_batch_sizes, max_queue_delay_us, instance_count, kind)
    validate_config(config)
    return config


def generation_model_config(
    name: str, *, max_batch_size: int, preferred_batch_sizes: Iterable[int], max_queue_delay_us: int,
    instance_count: int, parameters: Mapping[str, str],
) -> pb.ModelConfig:
    """The python-backend, decoupled generation model, tensor for tensor as in ``toolkit.repository.contract``."""
    config = pb.ModelConfig(name=name, backend="python")
    _add_input(config, c.INPUT_IDS, "TYPE_INT64", [-1], ragged=True)
    optional: list[tuple[str, str, list[int]]] = [
        (c.MAX_TOKENS, "TYPE_INT32", [1]),
        (c.TEMPERATURE, "TYPE_FP32", [1]),
        (c.TOP_P, "TYPE_FP32", [1]),
        (c.TOP_K, "TYPE_INT32", [1]),
        (c.SEED, "TYPE_INT64", [1]),
        (c.REPETITION_PENALTY, "TYPE_FP32", [1]),
        (c.STOP_TOKEN_IDS, "TYPE_INT64", [-1]),
        (c.IGNORE_EOS, "TYPE_BOOL", [1]),
    ]
    assert [n for n, _, _ in optional] == list(c.OPTIONAL_INPUTS), "contract.OPTIONAL_INPUTS changed"
    for tensor_name, dtype, dims in optional:
        _add_input(config, tensor_name, dtype, dims, optional=True, ragged=dims == [-1])
    _add_output(config, c.OUTPUT_IDS, "TYPE_INT64", [-1])
    _add_output(config, c.FINISH_REASON, "TYPE_STRING", [1])  # BYTES on the wire
    _add_output(config, c.PROMPT_TOKENS, "TYPE_INT32", [1])
    _add_output(config, c.COMPLETION_TOKENS, "TYPE_INT32", [1])
    config.model_transaction_policy.decoupled = True
    _batching(config, max_batch_size, preferred_batch_sizes, max_queue_delay_us, instance_count, "KIND_CPU")
    for key, value in sorted(parameters.items()):
        config.parameters[key].string_value = str(value)
    validate_config(config)
    return config


def validate_config(config: pb.ModelConfig) -> None:
    """Checks Triton makes at load time that the protobuf schema alone does not; raise ConfigError."""
    where = f"model {config.name!r}"
    if not config.name:
        raise ConfigError("a model config needs a name")
    if not (config.platform or config.backend):
        raise ConfigError(f"{where}: set a platform or a backend")
    if config.max_batch_size < 0:
        raise ConfigError(f"{where}: max_batch_size must be >= 0")
    for size in config.dynamic_batching.preferred_batch_size:
        if not 1 <= size <= config.max_batch_size:
            raise ConfigError(
                f"{where}: preferred batch size {size} must be between 1 and max_batch_size {config.max_batch_size}"
            )
    if config.model_transaction_policy.decoupled and config.backend != "python":
        raise ConfigError(f"{where}: only the python backend model can be decoupled here")
    seen: set[str] = set()
    for tensor in [*config.input, *config.output]:
        if tensor.name in seen:
            raise ConfigError(f"{where}: tensor {tensor.name!r} is declared twice")
        seen.add(tensor.name)
        if tensor.data_type == pb.TYPE_INVALID:
            raise ConfigError(f"{where}: tensor {tensor.name!r} has no data type")
        if not tensor.dims or any(d == 0 or d < -1 for d in tensor.dims):
            raise ConfigError(f"{where}: tensor {tensor.name!r} has invalid dims {list(tensor.dims)}")
    for group in config.instance_group:
        if group.count < 1:
            raise ConfigError(f"{where}: instance_group count must be >= 1")


def config_to_text(config: pb.ModelConfig) -> str:
    """The ``config.pbtxt`` text of a validated config."""
    validate_config(config)
    return text_format.MessageToString(config)


def write_config(model_dir: Path, config: pb.ModelConfig) -> Path:
    """Write ``<model_dir>/config.pbtxt`` (temp file + rename, so Triton never reads half a file)."""
    path = model_dir / CONFIG_FILE
    atomic_write_text(path, config_to_text(config))
    return path


def read_config(path: Path) -> pb.ModelConfig:
    """Parse and validate a ``config.pbtxt``; a malformed one raises ConfigError naming the file."""
    try:
        config = text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except text_format.ParseError as err:
        raise ConfigError(f"{path}: not a valid Triton model config: {err}") from None
    try:
        validate_config(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return config
