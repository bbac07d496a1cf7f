"""Triton ``config.pbtxt`` files, built from typed objects through Triton's own protobuf schema.

Every config is a ``model_config_pb2.ModelConfig`` message filled field by field and written with
``text_format``, never a string template: a wrong field name or data type fails here, at build
time, instead of when Triton loads the repository. :func:`validate_config` adds the checks Triton
itself makes at load time that the schema cannot express (preferred batch sizes within the max
batch size, a decoupled policy only on the python backend, unique tensor names, non-empty dims).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from toolkit.errors import ConfigError
from toolkit.files import atomic_write_text
from toolkit.repository import contract
from toolkit.repository.contract import CONFIG_FILE, LMInfo, TensorSpec

InstanceKind = Literal["KIND_AUTO", "KIND_CPU", "KIND_GPU"]


def data_type(name: str) -> int:
    """The ``DataType`` enum value of `name` (e.g. ``TYPE_FP32``); an unknown name fails the build."""
    try:
        return int(pb.DataType.Value(name))
    except ValueError:
        raise ConfigError(f"unknown Triton data type {name!r}; valid: {', '.join(pb.DataType.keys()[1:])}") from None


def _add_tensor(message: pb.ModelInput | pb.ModelOutput, spec: TensorSpec) -> None:
    message.name = spec.name
    message.data_type = data_type(spec.config_type)
    message.dims.extend(spec.shape)
    if isinstance(message, pb.ModelInput):
        message.optional = spec.optional
        message.allow_ragged_batch = spec.ragged


def _add_tensors(config: pb.ModelConfig, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> None:
    # max_batch_size > 0: Triton adds the batch dim itself, so the specs' dims start after it.
    for spec in inputs:
        _add_tensor(config.input.add(), spec)
    for spec in outputs:
        _add_tensor(config.output.add(), spec)


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
    """A ``tensorrt_plan`` core model over a plan built by ``toolkit.repository.plan_script``.

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
    _add_tensors(config, contract.core_inputs(lm_info), contract.core_outputs(lm_info))
    _batching(config, max_batch_size, preferred_batch_sizes, max_queue_delay_us, instance_count, kind)
    validate_config(config)
    return config


def generation_model_config(
    name: str, *, max_batch_size: int, preferred_batch_sizes: Iterable[int], max_queue_delay_us: int,
    instance_count: int, parameters: Mapping[str, str],
) -> pb.ModelConfig:
    """The python-backend, decoupled generation model: the tensors of ``contract.GENERATION_INPUTS/OUTPUTS``."""
    config = pb.ModelConfig(name=name, backend="python")
    _add_tensors(config, contract.GENERATION_INPUTS, contract.GENERATION_OUTPUTS)
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
    """Parse and validate a ``config.pbtxt``; a malformed one raises ConfigError naming the file.

    The one reader of repository configs (build, ``toolkit serve``, gateway). The generation model
    inside Triton, where protobuf is not installed, uses :mod:`toolkit.repository.pbtxt_scan`,
    which a test holds to the same answers.
    """
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


def model_parameters(config: pb.ModelConfig) -> dict[str, str]:
    """A config's ``parameters`` map as plain strings (the toolkit writes string values only)."""
    return {key: value.string_value for key, value in config.parameters.items()}
