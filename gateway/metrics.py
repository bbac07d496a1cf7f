"""Gateway metrics (Prometheus) and the ASGI middleware that counts every request.

Each app owns its registry, so several apps in one process (tests) do not collide. Route labels
are the route templates (``/admin/models/{name}/load``), never raw paths, to bound cardinality.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)
_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30)


class GatewayMetrics:
    """Every metric the gateway exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "HTTP requests by route, method and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "HTTP request latency (streams: until the last byte)",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge("gateway_requests_in_flight", "Generation requests in flight", registry=r)
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "From admission to the first generated token",
            ["model"],
            buckets=_TTFT_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            "gateway_inter_token_latency_seconds",
            "Between consecutive streamed token responses",
            ["model"],
            buckets=_TOKEN_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens sent to Triton", ["model"], registry=r)
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Completion tokens generated", ["model"], registry=r
        )
        self.rejections = Counter(
            "gateway_rejected_requests", "Requests refused before reaching Triton", ["reason"], registry=r
        )
        self.triton_up = Gauge("gateway_triton_endpoint_up", "1 when the endpoint is ready", ["url"], registry=r)


def route_label(scope: Scope) -> str:
    """The matched route template, or 'unmatched' (raw paths would explode cardinality)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Counts requests by route and status and times them until the response's last byte."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route_label(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
