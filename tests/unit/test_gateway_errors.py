"""The one error mapping: every exception becomes an OpenAI-shaped body with the right status."""

from __future__ import annotations

import json

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from gateway.error_responses import (
    BadRequestError,
    BodyTooLargeError,
    GatewayError,
    ModelNotFoundError,
    TooManyRequestsError,
    TritonUnavailableError,
    UnauthorizedError,
    to_error_response,
)
from gateway.triton import map_triton_error


def body_of(exc: Exception) -> tuple[int, dict, dict]:
    response = to_error_response(exc)
    return response.status_code, json.loads(bytes(response.body)), dict(response.headers)


@pytest.mark.parametrize(
    ("exc", "status", "error_type"),
    [
        (BadRequestError("bad", param="n"), 400, "invalid_request_error"),
        (UnauthorizedError("no key"), 401, "authentication_error"),
        (ModelNotFoundError("no model", param="model", code="model_not_found"), 404, "invalid_request_error"),
        (BodyTooLargeError("big"), 413, "invalid_request_error"),
        (TooManyRequestsError("slow down", retry_after_s=7), 429, "rate_limit_error"),
        (TritonUnavailableError("down"), 503, "service_unavailable"),
        (RuntimeError("secret internals"), 500, "internal_error"),
    ],
)
def test_shape_and_status(exc: Exception, status: int, error_type: str) -> None:
    code, body, headers = body_of(exc)
    assert code == status
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == error_type
    if status == 429:
        assert headers["retry-after"] == "7"
    if status == 500:
        assert "secret" not in body["error"]["message"]  # internals are logged, not sent


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "connection refused"


@pytest.mark.parametrize(
    ("err", "status"),
    [
        (FakeRpcError(grpc.StatusCode.UNAVAILABLE), 503),
        (FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED), 504),
        (FakeRpcError(grpc.StatusCode.INTERNAL), 502),
        (InferenceServerException("server busy: 64 requests already queued (max_queue=64); retry later"), 429),
        (InferenceServerException("shutting down: the model is unloading; retry on another instance"), 503),
        (InferenceServerException("Request for unknown model: 'x' is not found"), 503),
        # Triton 2.51 draining after SIGTERM, and its python backend's stub gone (both measured)
        (InferenceServerException("[request id: <id_unknown>] Server is stopping, scheduler for model has stopped "
                                  "accepting new inference requests"), 503),
        (InferenceServerException("Request for unknown model: 'tiny-chat' has no available versions"), 503),
        (InferenceServerException("Stub process 'tiny-chat_0_0' is not healthy."), 503),
        (InferenceServerException("invalid request: max_tokens is 5000; this model allows at most 1000"), 400),
        # the model's own faults are the server's, never the client's
        (InferenceServerException("internal error: RuntimeError: onnxruntime failed"), 502),
        (InferenceServerException("the decode step failed: CUDA out of memory"), 502),
        (InferenceServerException(""), 502),
    ],
)
def test_triton_failures_map_to_client_errors(err: Exception, status: int) -> None:
    mapped = map_triton_error(err, "127.0.0.1:8001")
    assert isinstance(mapped, GatewayError) and mapped.status_code == status
