"""What a repository is written with: one typed source per served value, filled by the build's repository stage.

The writer (:func:`toolkit.repository.writer.write_repository`) takes a :class:`RepositorySpec` and
nothing from the build config: the stage turns the config into this spec, so the repository format
does not depend on how the build is configured. :class:`GenerationLimits` is the one served value that
has readers besides Triton: it goes into the generation model's ``config.pbtxt`` as parameters
(:meth:`GenerationLimits.parameters`), and the generation model and the gateway read it back with
:meth:`GenerationLimits.from_parameters`; its defaults are the build config's defaults too. The
context length is not here: the manifest holds it (one place), since it is a fact of the model.

The standard library only: this runs inside Triton's python backend and in the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from toolkit.errors import ConfigError
from toolkit.repository import contract

ServingPrecision = Literal["fp32", "int8", "auto"]
Runner = Literal["onnxruntime", "bls"]
DEFAULT_MAX_NEW_TOKENS_LIMIT = 1024


@dataclass(frozen=True)
class GenerationLimits:
    """The generation model's limits, per Triton instance of it.

    A Triton instance generates for ``max_active_sequences`` requests at once and queues up to
    ``max_queue`` more; past that it refuses a request as busy (the gateway answers 429). So one
    instance holds at most :attr:`accepted_requests` requests.
    """

    max_active_sequences: int = 32
    max_queue: int = 256
    max_new_tokens_limit: int | None = DEFAULT_MAX_NEW_TOKENS_LIMIT  # None: up to the rest of the context
    grammar_compile_timeout_s: float = 10.0  # a grammar compiling longer is refused

    @property
    def accepted_requests(self) -> int:
        """Requests one generation-model instance holds before it refuses more: active plus queued."""
        return self.max_active_sequences + self.max_queue

    def parameters(self) -> dict[str, str]:
        """The ``config.pbtxt`` parameters (string values) that carry these limits."""
        params = {
            contract.PARAM_MAX_ACTIVE: str(self.max_active_sequences),
            contract.PARAM_MAX_QUEUE: str(self.max_queue),
            contract.PARAM_GRAMMAR_TIMEOUT: f"{self.grammar_compile_timeout_s:g}",
        }
        if self.max_new_tokens_limit is not None:
            params[contract.PARAM_MAX_NEW_TOKENS] = str(self.max_new_tokens_limit)
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> GenerationLimits:
        """The limits a generation model's parameters declare; a parameter left out (or empty) takes its default,
        except ``max_new_tokens_limit``, which is then the whole context (repositories before the parameter)."""
        defaults = cls()

        def number(name: str, default: float | None, kind: type[int] | type[float]) -> float | None:
            text = (params.get(name) or "").strip()
            if not text:
                return default
            try:
                value = kind(text)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise ConfigError(f"config.pbtxt parameter {name}={text!r} is not {what}") from None
            if value <= 0:
                raise ConfigError(f"config.pbtxt parameter {name}={text!r} must be above 0")
            return value

        return cls(
            max_active_sequences=int(number(contract.PARAM_MAX_ACTIVE, defaults.max_active_sequences, int) or 0),
            max_queue=int(number(contract.PARAM_MAX_QUEUE, defaults.max_queue, int) or 0),
            max_new_tokens_limit=(None if (limit := number(contract.PARAM_MAX_NEW_TOKENS, None, int)) is None
                                  else int(limit)),
            grammar_compile_timeout_s=float(number(contract.PARAM_GRAMMAR_TIMEOUT,
                                                   defaults.grammar_compile_timeout_s, float) or 0),
        )


DEFAULT_LIMITS = GenerationLimits()


@dataclass(frozen=True)
class Batching:
    """Triton's batching and instances, the same for the generation model and its core models."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    instance_count: int


@dataclass(frozen=True)
class PlanSpec:
    """The TensorRT plans' build script: which precisions, which trtexec, and the shapes the plans take."""

    precisions: tuple[str, ...]
    trtexec: str
    opt_batch_size: int
    max_input_len: int
    workspace_mib: int


@dataclass(frozen=True)
class RepositorySpec:
    """Everything the writer writes that is not the model itself (the build config's defaults are its defaults:
    the repository stage fills it, :func:`toolkit.stages.model_repository.repository_spec`)."""

    batching: Batching
    limits: GenerationLimits
    context_length: int  # written to the manifest (the one place it is stored)
    serving_precision: ServingPrecision  # which core model the generation model runs
    runner: Runner
    keep_versions: int
