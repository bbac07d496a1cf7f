"""Shared app state and the request dependencies, as ``Annotated`` aliases for route signatures."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from gateway.error_responses import ForbiddenError, UnauthorizedError
from gateway.limits import InFlightLimiter, PerKeyLimiter, RateLimiter
from gateway.metrics import GatewayMetrics
from gateway.registry import ModelRegistry
from gateway.settings import GatewaySettings
from gateway.triton import TritonPool


@dataclass
class AppState:
    """Everything created once per app by the lifespan and shared by every request."""

    settings: GatewaySettings
    registry: ModelRegistry
    pool: TritonPool
    metrics: GatewayMetrics
    in_flight: InFlightLimiter
    rate_limiter: RateLimiter
    per_key: PerKeyLimiter
    admin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.gateway
    return state


State = Annotated[AppState, Depends(get_state)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: frozenset[str]) -> bool:
    # Compare against every key in constant time, so timing does not reveal a key's prefix.
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in keys)


def require_api_key(request: Request, state: State) -> str:
    """The caller's identity for rate limits: its key, or its address when auth is off; 401 on a bad key."""
    if not state.settings.auth_enabled:
        return f"anonymous:{request.client.host if request.client else 'unknown'}"
    token = _bearer(request)
    if token is None:
        raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not _matches(token, state.settings.accepted_keys()):
        raise UnauthorizedError("invalid API key", code="invalid_api_key")
    return token


def require_admin_key(request: Request, state: State) -> str:
    """An admin key; with no admin key configured, the admin endpoints stay closed (API keys never open them)."""
    keys = state.settings.admin_keys()
    if not keys:
        raise ForbiddenError("admin endpoints are disabled: set GATEWAY_ADMIN_API_KEYS (separate from the API keys)")
    token = _bearer(request)
    if token is None:
        raise UnauthorizedError("missing admin API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not _matches(token, keys):
        raise UnauthorizedError("invalid admin API key", code="invalid_api_key")
    return token


def require_health_access(request: Request, state: State) -> None:
    """Health endpoints are open unless GATEWAY_OPEN_HEALTH=false."""
    if not state.settings.open_health:
        require_api_key(request, state)


def require_metrics_access(request: Request, state: State) -> None:
    """/metrics is open unless GATEWAY_OPEN_METRICS=false."""
    if not state.settings.open_metrics:
        require_api_key(request, state)


ApiKey = Annotated[str, Depends(require_api_key)]
AdminKey = Annotated[str, Depends(require_admin_key)]
HealthAccess = Annotated[None, Depends(require_health_access)]
MetricsAccess = Annotated[None, Depends(require_metrics_access)]
