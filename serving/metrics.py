"""Prometheus metrics of one service instance (prometheus-client, a registry per app so that several
apps in one process, as in the tests, do not share counters)."""

from __future__ import annotations

import time
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Upper bounds of the batch-size histogram: every size up to 8, then powers of two.
BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 128)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """The service's counters, histograms and gauges, named ``ram_serve_*``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("ram_serve_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("ram_serve_errors", "Requests answered with a 4xx / 5xx status, by reason "
                              "(bad_input, bad_parameter, too_large, overloaded, timeout, ...)",
                              ["endpoint", "reason"], registry=r)
        self.latency = Histogram("ram_serve_request_seconds", "Time from request to response", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("ram_serve_images", "Images tagged", registry=r)
        self.batch_size = Histogram("ram_serve_batch_size", "Images per encoder call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("ram_serve_batch_seconds", "Model time per batch (encode + decode)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queued = Gauge("ram_serve_queued_images", "Images waiting for the model", registry=r)
        self.in_flight = Gauge("ram_serve_requests_in_flight", "Tag requests admitted and not yet answered",
                               registry=r)


class RequestMetricsMiddleware:
    """Counts every HTTP response by endpoint and status and times it. Endpoints outside ``endpoints``
    are counted as ``other``, so that scanning arbitrary URLs cannot grow the label set."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, endpoints: Iterable[str]):
        self.app, self.metrics = app, metrics
        self.endpoints = frozenset(endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else ("/static" if path.startswith("/static/") else "other")
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(endpoint, _reason(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


#: The ``reason`` label of ``ram_serve_errors_total`` per status (fixed names: Python's status phrases
#: change between versions).
REASONS = {400: "bad_input", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
           408: "request_timeout", 413: "too_large", 422: "bad_parameter", 500: "internal", 503: "overloaded",
           504: "timeout"}


def _reason(status: int) -> str:
    return REASONS.get(status, f"http_{status}")
