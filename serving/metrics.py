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
BUILD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


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
        self.batch_targets = Histogram("ram_serve_batch_targets", "Distinct targets per batch (vocabularies, "
                                       "request tag lists, class lists), each decoded on its own rows",
                                       buckets=(1, 2, 3, 4, 6, 8, 16), registry=r)
        self.vocabularies = Gauge("ram_serve_vocabularies", "Vocabularies stored by POST /v1/vocabularies", registry=r)
        self.build_seconds = Histogram("ram_serve_vocabulary_build_seconds", "Text encoding time of a vocabulary "
                                       "build", buckets=BUILD_BUCKETS, registry=r)
        self.text_cache = Counter("ram_serve_text_cache", "Requests with tags or classify words, by whether their "
                                  "embeddings were cached (hit) or had to be encoded (miss)", ["result"], registry=r)
        self.queued = Gauge("ram_serve_queued_images", "Images waiting for the model", registry=r)
        self.in_flight = Gauge("ram_serve_requests_in_flight", "Requests with a body (tag requests, vocabulary "
                               "uploads) admitted and not yet answered", registry=r)


class RequestMetricsMiddleware:
    """Counts every HTTP response by endpoint and status and times it. Endpoints outside ``endpoints``
    are counted as ``other``, so that scanning arbitrary URLs cannot grow the label set."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, endpoints: Iterable[str]):
        self.app, self.metrics = app, metrics
        endpoints = list(endpoints)
        self.endpoints = frozenset(e for e in endpoints if "{" not in e)
        #: "/v1/vocabularies/{id}" -> counted under that name for every id: ids do not grow the label set
        self.templates = [(e[:e.index("{")], e) for e in endpoints if "{" in e]

    def _label(self, path: str) -> str:
        if path in self.endpoints:
            return path
        if path.startswith("/static/"):
            return "/static"
        for prefix, template in self.templates:
            rest = path[len(prefix):]
            if path.startswith(prefix) and rest and "/" not in rest:
                return template
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self._label(scope.get("path", ""))
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
           408: "request_timeout", 409: "conflict", 413: "too_large", 422: "bad_parameter", 500: "internal",
           501: "not_implemented", 503: "overloaded", 504: "timeout"}


def _reason(status: int) -> str:
    return REASONS.get(status, f"http_{status}")
