"""The service's Prometheus metrics (`GET /metrics`, prometheus-client's text format).

    vclr_requests_total{route, method, status}       requests answered, by route template (never a raw path)
    vclr_request_seconds{route}                     latency histogram, by route
    vclr_query_batch_size                           queries embedded and searched together (histogram)
    vclr_queue_depth                                queries waiting for the worker
    vclr_text_cache_hits_total / _misses_total      the text query embedding cache
    vclr_index_images / vclr_index_captions         live items of the index being served
    vclr_index_swaps_total                          new saves of the index swapped in
    vclr_index_info{version}                        the version being served (value 1)

Each app has its own registry (tests and embedders may create several apps in one process); the engine's own
counters are read when Prometheus scrapes, so the hot path only observes latencies and batch sizes.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("vclr_requests", "Requests answered", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("vclr_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.batch_size = Histogram("vclr_query_batch_size", "Queries per worker batch", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The query engine's counters and the served index, read at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        engine, searcher = self.engine, self.engine.live.current
        manifest, cache = searcher.index.manifest, searcher.text_cache
        yield GaugeMetricFamily("vclr_queue_depth", "Queries waiting for the worker", value=engine.waiting)
        hits = CounterMetricFamily("vclr_text_cache_hits", "Text query embeddings served from the cache")
        misses = CounterMetricFamily("vclr_text_cache_misses", "Text query embeddings computed")
        hits.add_metric([], cache.hits if cache else 0)
        misses.add_metric([], cache.misses if cache else 0)
        yield hits
        yield misses
        yield GaugeMetricFamily("vclr_index_images", "Live images of the served index",
                                value=manifest["num_images"] - manifest["deleted_images"])
        yield GaugeMetricFamily("vclr_index_captions", "Live captions of the served index",
                                value=manifest["num_texts"] - manifest["deleted_texts"])
        swaps = CounterMetricFamily("vclr_index_swaps", "New saves of the index swapped in")
        swaps.add_metric([], engine.live.swaps)
        yield swaps
        info = GaugeMetricFamily("vclr_index_info", "The index version being served", labels=["version"])
        info.add_metric([searcher.index.version], 1)
        yield info


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (an unmatched path counts as "other"), outside
    the access guard: refused requests (401, 413, 429) are counted too."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.observe(route, scope["method"], status[0], time.perf_counter() - start)
