"""``/health/live``, ``/health/ready`` and ``/metrics``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.deps import AppState, HealthAccess, MetricsAccess, State
from gateway.triton import Endpoint

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live(_: HealthAccess) -> dict[str, str]:
    """The process answers (it may not be ready)."""
    return {"status": "live"}


async def _model_ready(state: AppState, endpoint: Endpoint, model: str) -> bool:
    try:
        ready = await endpoint.client.is_model_ready(model, client_timeout=state.settings.triton_timeout_s)
    except Exception:  # noqa: BLE001 - unreachable counts as not ready
        return False
    return bool(ready)


@router.get("/health/ready", responses={503: {"description": "Triton or the default model is not ready"}})
async def ready(state: State, _: HealthAccess) -> JSONResponse:
    """Ready only when a Triton endpoint is ready and has the default model ready (checked now)."""
    model = state.registry.default
    endpoints = state.pool.healthy()
    checks = await asyncio.gather(*(_model_ready(state, e, model) for e in endpoints))
    ready_urls = [e.url for e, ok in zip(endpoints, checks, strict=True) if ok]
    body = {
        "status": "ready" if ready_urls else "not ready",
        "model": model,
        "triton": {
            **{e.url: ("ready" if e.url in ready_urls else (e.last_error or "model not ready"))
               for e in state.pool.endpoints},
            **state.pool.unresolved,  # a host name with no address now: why
        },
    }
    return JSONResponse(body, status_code=200 if ready_urls else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State, _: MetricsAccess) -> Response:
    """Prometheus exposition of the gateway's metrics."""
    state.metrics.in_flight.set(state.in_flight.count)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
