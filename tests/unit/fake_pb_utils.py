"""A stand-in for Triton's ``triton_python_backend_utils``: just enough to unit-test the adapter and the
BLS runner's tensor marshalling without a server. Integration tests use the real one."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonModelException(Exception):  # noqa: N818 - the real name
    pass


class TritonError:
    def __init__(self, message: str):
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None):
        self.output_tensors, self._error = output_tensors, error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors if t.name() == name), None)


class InferenceRequest:
    executor: Any = None  # set by a test: callable(request) -> InferenceResponse

    def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[Tensor]):
        self.model_name, self.requested_output_names, self.inputs = model_name, requested_output_names, inputs

    def exec(self) -> InferenceResponse:
        return InferenceRequest.executor(self)


class ResponseSender:
    def __init__(self) -> None:
        self.sent: list[tuple[InferenceResponse, int]] = []

    def send(self, response: InferenceResponse, flags: int = 0) -> None:
        assert not any(f & TRITONSERVER_RESPONSE_COMPLETE_FINAL for _, f in self.sent), "sent after the final flag"
        self.sent.append((response, flags))

    @property
    def final(self) -> bool:
        return any(f & TRITONSERVER_RESPONSE_COMPLETE_FINAL for _, f in self.sent)


class Request:
    def __init__(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any] | None = None):
        self._inputs = [Tensor(k, v) for k, v in inputs.items()]
        self._parameters = json.dumps(parameters or {})
        self.sender = ResponseSender()
        self.cancelled = False

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def parameters(self) -> str:
        return self._parameters

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.cancelled


class _Metric:
    def __init__(self) -> None:
        self.values: list[float] = []

    def increment(self, v: float) -> None:
        self.values.append(v)

    def set(self, v: float) -> None:
        self.values.append(v)

    def observe(self, v: float) -> None:
        self.values.append(v)


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2
    families: dict[str, MetricFamily] = {}

    def __init__(self, name: str, description: str, kind: int):
        self.name, self.kind, self.metrics = name, kind, []
        MetricFamily.families[name] = self

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> _Metric:  # noqa: N802
        assert (buckets is not None) == (self.kind == self.HISTOGRAM)
        metric = _Metric()
        self.metrics.append(metric)
        return metric


def using_decoupled_model_transaction_policy(config: dict[str, Any]) -> bool:
    return bool(config.get("model_transaction_policy", {}).get("decoupled"))
