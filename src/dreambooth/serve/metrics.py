"""Prometheus metrics of `dreambooth serve`: queue depth, requests, latency, images, batches.

`ServeMetrics` holds one app's metrics in a registry of its own (so two apps in one process,
as in the tests, never share counts); `RequestMetrics` is the ASGI middleware that counts and
times every request. `/metrics` (in `dreambooth.serve.routes`) renders the registry.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServeMetrics:
    """Prometheus metrics of one app, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("dreambooth_queue_depth", "Requests waiting for a batch.",
                                 ["model"], registry=self.registry)
        self.requests = Counter("dreambooth_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "dreambooth_request_latency_seconds", "Time from request to answer, by route.",
            ["route"], registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.images = Counter("dreambooth_images", "Images generated.", ["model"],
                              registry=self.registry)
        self.batch_images = Histogram("dreambooth_batch_images", "Images per UNet batch.",
                                      ["model"], registry=self.registry,
                                      buckets=(1, 2, 4, 8, 16, 32, 64))
        self.cancelled = Counter("dreambooth_cancelled_jobs", "Requests dropped or interrupted "
                                 "because their client went away.", ["model"],
                                 registry=self.registry)
        self.batch_seconds = Histogram("dreambooth_batch_seconds", "Time to run one batch.",
                                       ["model"], registry=self.registry)

    def batch_done(self, model: str, images: int, seconds: float) -> None:
        self.images.labels(model).inc(images)
        self.batch_images.labels(model).observe(images)
        self.batch_seconds.labels(model).observe(seconds)


class RequestMetrics:
    """ASGI middleware: count requests and time them, labelled by route template."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client gets if the app raises before answering

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The router stores the matched route in the scope; unmatched paths share one label
            # so that scanners cannot blow up the metric's cardinality.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
