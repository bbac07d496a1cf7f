"""Gateway errors and the one function that turns any exception into an OpenAI-shaped response.

Every error leaves the gateway as ``{"error": {"message", "type", "param", "code"}}`` with its
HTTP status; a 429 carries ``Retry-After``. Routes raise :class:`GatewayError` (or a child);
validation errors, unknown routes and bugs are mapped here too, so there is one place to read.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("gateway")


class GatewayError(Exception):
    """An error with an HTTP status, an OpenAI error type and an optional offending parameter."""

    status_code = 500
    error_type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        if status_code is not None:
            self.status_code = status_code


class BadRequestError(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class UnauthorizedError(GatewayError):
    status_code = 401
    error_type = "authentication_error"


class ForbiddenError(GatewayError):
    status_code = 403
    error_type = "permission_error"


class ModelNotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"


class BodyTooLargeError(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"


class TooManyRequestsError(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"


class TritonUnavailableError(GatewayError):
    status_code = 503
    error_type = "service_unavailable"


class UpstreamTimeoutError(GatewayError):
    status_code = 504
    error_type = "timeout_error"


def error_body(status_code: int, message: str, error_type: str, param: str | None, code: str | None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _union_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str | None, str | None]:
    errors = exc.errors()
    # A union (content: str | list of parts) reports one error per member: the validator's own
    # message (a value_error) says most, so it goes first.
    first = min(errors, key=lambda e: e.get("type") != "value_error") if errors else {}
    if first.get("type") == "json_invalid":
        return 400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", None, None
    # Drop "body" and the union members' tags ("function-after[...]", "list[TextPart]", "str").
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _union_tag(part)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing" and param:
        message = f"'{param}' is required"
    elif param:
        message = f"{param}: {message}"
    extra = len(errors) - 1
    if extra > 0:
        message += f" (and {extra} more error{'s' if extra > 1 else ''})"
    return 422, message, param, first.get("type")


def to_error_response(exc: Exception) -> JSONResponse:
    """THE mapping from an exception to an OpenAI error response (every handler goes through here)."""
    headers: dict[str, str] = {}
    if isinstance(exc, GatewayError):
        status, message, error_type, param, code = exc.status_code, exc.message, exc.error_type, exc.param, exc.code
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, int(exc.retry_after_s)))
    elif isinstance(exc, RequestValidationError):
        status, message, param, code = _describe_validation(exc)
        error_type = "invalid_request_error"
    elif isinstance(exc, StarletteHTTPException):
        status, message, param, code = exc.status_code, str(exc.detail), None, None
        error_type = "not_found_error" if status == 404 else "invalid_request_error"
        headers.update(exc.headers or {})
    else:
        logger.exception("unhandled error", exc_info=exc)
        status, message, error_type, param, code = 500, "internal server error", "internal_error", None, None
    return JSONResponse(error_body(status, message, error_type, param, code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception class the app can see through :func:`to_error_response`."""

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return to_error_response(exc)

    for exc_class in (GatewayError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_class, handle)
