"""Prometheus metrics of one server instance, in its own registry, and the /metrics endpoint.

Names follow the Prometheus conventions: ``vaegan_`` prefix, base units (seconds), ``_total``
on counters. A dedicated :class:`~prometheus_client.CollectorRegistry` per server keeps several
servers in one process (tests) apart.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

__all__ = ["MetricsEndpoint", "ServerMetrics", "start_metrics_endpoint"]

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SCORE_BUCKETS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0, 50.0, 100.0)


class ServerMetrics:
    """Every metric the server exports; ``registry`` is the instance's own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "vaegan_requests_total", "RPCs finished, by method and gRPC status code",
            ["method", "code"], registry=r,
        )
        self.latency = Histogram(
            "vaegan_request_duration_seconds", "RPC latency from arrival to the last response",
            ["method"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "vaegan_requests_in_flight", "RPCs being served now", ["method"], registry=r
        )
        self.images = Counter(
            "vaegan_images_total", "Images processed successfully, by method", ["method"],
            registry=r,
        )
        self.batch_size = Histogram(
            "vaegan_batch_size", "Images per merged model run (the dynamic batcher's batches)",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "vaegan_queue_wait_seconds", "Time images wait in the batcher before their run starts",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference = Histogram(
            "vaegan_inference_seconds",
            "ONNX Runtime time per merged batch, by graph (forward = all three graphs)",
            ["graph"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.outliers = Counter(
            "vaegan_outliers_total", "Images scored above their decision threshold", registry=r
        )
        self.scores = Histogram(
            "vaegan_outlier_score", "Distribution of outlier scores (drift shows here first)",
            buckets=SCORE_BUCKETS, registry=r,
        )
        self.model = Info("vaegan_model", "The served model and execution provider", registry=r)

    def set_model(self, name: str, version: str, provider: str) -> None:
        self.model.info({"name": name, "version": version, "provider": provider})

    def observe_batch(self, n_images: int, timings: dict[str, float]) -> None:
        """One merged run of ``n_images``; ``timings``: seconds by graph (and ``forward``)."""
        self.batch_size.observe(n_images)
        for graph, seconds in timings.items():
            self.inference.labels(graph).observe(seconds)


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server (prometheus_client's, on a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_endpoint(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve ``registry`` on ``http://host:port/metrics``; port 0 picks a free one."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    endpoint = MetricsEndpoint(server, thread)
    logger.info("metrics on http://%s:%d/metrics", host, endpoint.port)
    return endpoint
