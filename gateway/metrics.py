"""Gateway metrics (Prometheus) and the ASGI middleware that counts every request.

Each app owns its registry, so several apps in one process (tests) do not collide. Route labels
are the route templates (``/admin/models/{name}/load``), never raw paths, to bound cardinality.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

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
        self.routing = RoutingMetrics(r)
        self.triton_up = self.routing.up


RETRY_REASONS = ("unavailable", "busy", "taken_out")
EJECTION_SOURCES = ("probe", "request")


class RoutingMetrics:
    """Per-replica routing: the label ``replica`` is the address of one Triton (``10.0.0.7:8001``).

    The gauges follow every request as it is dispatched and ends; the series of a replica that left
    (its name no longer resolves to it, its requests ended) are removed, so pods coming and going do
    not pile up series.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.up = Gauge("gateway_triton_endpoint_up", "1 when the endpoint is ready", ["url"], registry=r)
        self.in_flight = Gauge("gateway_triton_replica_in_flight", "Generation requests in flight on each Triton "
                               "replica", ["replica"], registry=r)
        self.outstanding_tokens = Gauge(
            "gateway_triton_replica_outstanding_tokens",
            "Tokens the requests in flight on each replica may still generate (max_tokens minus tokens received)",
            ["replica"], registry=r)
        self.routed = Counter("gateway_triton_routed_requests", "Generation requests sent to each replica (a retry "
                              "counts on the replica it went to)", ["replica"], registry=r)
        self.retries = Counter(
            "gateway_triton_retries", "Requests moved to another replica before their first token, by the replica "
            "that failed and why (unavailable, busy, taken_out)", ["replica", "reason"], registry=r)
        self.ejections = Counter("gateway_triton_ejections", "Times a replica was taken out of routing, by what "
                                 "found it down (probe, request)", ["replica", "source"], registry=r)

    def forget(self, replica: str) -> None:
        """Drop every series of a replica that is gone for good."""
        labels: list[tuple[Any, tuple[str, ...]]] = [
            (m, (replica,)) for m in (self.up, self.in_flight, self.outstanding_tokens, self.routed)]
        labels += [(self.retries, (replica, reason)) for reason in RETRY_REASONS]
        labels += [(self.ejections, (replica, source)) for source in EJECTION_SOURCES]
        for metric, values in labels:
            with contextlib.suppress(KeyError):
                metric.remove(*values)


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
