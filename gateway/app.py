"""The app factory: ``uvicorn gateway.app:create_app --factory`` (or ``python -m gateway``).

Settings and the repository (manifests, tokenizers) are read in :func:`create_app`, so a bad
setting or an unservable repository stops the start-up with one message. The Triton client pool
is created in the lifespan, inside the server's event loop, and closed with it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from gateway.chat.router import router as chat_router
from gateway.completions.router import router as completions_router
from gateway.deps import AppState
from gateway.error_responses import install_error_handlers
from gateway.health import router as health_router
from gateway.hosts import TrustedHostMiddleware
from gateway.limits import BodySizeLimitMiddleware, InFlightLimiter, PerKeyLimiter, RateLimiter
from gateway.metrics import GatewayMetrics, MetricsMiddleware, RoutingMetrics
from gateway.models import model_summary
from gateway.models import router as models_router
from gateway.page import install_page
from gateway.registry import ModelRegistry
from gateway.settings import GatewaySettings
from gateway.triton import TritonPool
from gateway.versions import router as versions_router
from toolkit import __version__

logger = logging.getLogger("gateway")


def _triton_pool(settings: GatewaySettings, metrics: RoutingMetrics | None = None) -> TritonPool:
    return TritonPool(settings.triton_urls, settings.triton_timeout_s, settings.health_interval_s,
                      settings.grpc_keepalive_s, settings.triton_resolve_interval_s, metrics=metrics)


def check_in_flight_bound(settings: GatewaySettings, registry: ModelRegistry) -> None:
    """Warn when GATEWAY_MAX_IN_FLIGHT admits more requests than the Tritons hold; they would refuse the rest.

    Each Triton URL holds, per generation model, instances x (max_active_sequences + max_queue) requests
    (the repository's config.pbtxt); past that Triton answers busy, which the gateway also turns into 429.
    A URL that resolves to several replicas holds more, so the bound counts one per URL (the least).
    """
    held = len(settings.triton_urls) * min(entry.accepted_requests for entry in registry.entries())
    if settings.max_in_flight > held:
        entry = min(registry.entries(), key=lambda e: e.accepted_requests)
        logger.warning(
            "GATEWAY_MAX_IN_FLIGHT=%d is above what Triton holds for model %s: %d Triton URL(s) x %d instance(s) "
            "x (max_active_sequences %d + max_queue %d) = %d; past %d requests Triton refuses them as busy (429) "
            "before the gateway's own bound does. Lower GATEWAY_MAX_IN_FLIGHT to %d or raise serving.max_queue.",
            settings.max_in_flight, entry.name, len(settings.triton_urls), entry.instances,
            entry.limits.max_active_sequences, entry.limits.max_queue, held, held, held)


def create_app(
    settings: GatewaySettings | None = None, pool_factory: Callable[[GatewaySettings], TritonPool] | None = None
) -> FastAPI:
    """Build the gateway app; raises on invalid settings or a repository with no servable chat model.

    `pool_factory` replaces the Triton client pool (unit tests pass a fake one).
    """
    if not logger.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    settings = settings or GatewaySettings()
    registry = ModelRegistry.from_repository(settings.repository, settings.default_model)
    check_in_flight_bound(settings, registry)
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = pool_factory(settings) if pool_factory else _triton_pool(settings, metrics.routing)
        pool.watched_models = set(registry.names())
        state = AppState(
            settings=settings,
            registry=registry,
            pool=pool,
            metrics=metrics,
            in_flight=InFlightLimiter(settings.max_in_flight, settings.retry_after_s),
            rate_limiter=RateLimiter(settings.rate_limit_requests_per_minute, settings.rate_limit_tokens_per_minute,
                                     max_keys=settings.rate_limit_max_keys),
            per_key=PerKeyLimiter(settings.max_in_flight_per_key, settings.retry_after_s),
        )
        app.state.gateway = state
        await pool.start()
        logger.info(
            "gateway ready: Triton %s, %s, auth %s",
            ", ".join(f"{e.url} ({'up' if e.healthy else 'DOWN'})" for e in pool.endpoints),
            model_summary(state),
            "on" if settings.auth_enabled else "off",
        )
        try:
            yield
        finally:
            await pool.close()

    docs: dict[str, Any] = {} if settings.enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="triton-chat-toolkit gateway",
        version=__version__,
        description="OpenAI-compatible chat API in front of NVIDIA Triton, with the model's own chat template.",
        lifespan=lifespan,
        **docs,
    )
    install_error_handlers(app)
    app.include_router(chat_router)
    app.include_router(completions_router)
    app.include_router(models_router)
    app.include_router(versions_router)
    app.include_router(health_router)
    install_page(app)
    # Added last = outermost: metrics also count the 413s the body limit answers.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    allowed_hosts = settings.allowed_hosts()
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed=allowed_hosts)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
