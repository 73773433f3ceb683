"""Prometheus metrics of one server instance, in its own registry, and the /metrics endpoint.

Names follow the Prometheus conventions: ``vaegan_`` prefix, base units (seconds), ``_total``
on counters. A dedicated :class:`~prometheus_client.CollectorRegistry` per server keeps several
servers in one process (tests) apart.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from vaegan.service.server.auth import BasicAuth

__all__ = ["MetricsEndpoint", "MetricsSecurity", "ServerMetrics", "start_metrics_endpoint"]

WSGIApp = Callable[[dict[str, Any], Any], Iterable[bytes]]

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SCORE_BUCKETS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0, 50.0, 100.0)


class ServerMetrics:
    """Every metric the server exports; ``registry`` is the instance's own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        # model and version: those the call resolved ("" when it failed before naming one)
        self.requests = Counter(
            "vaegan_requests_total", "RPCs finished, by method, gRPC status code, model and version",
            ["method", "code", "model", "version"], registry=r,
        )
        self.latency = Histogram(
            "vaegan_request_duration_seconds", "RPC latency from arrival to the last response",
            ["method", "model", "version"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "vaegan_requests_in_flight", "RPCs being served now", ["method"], registry=r
        )
        # series about the work of one model carry its name and version (a repository serves several)
        per_model = ["model", "version"]
        self.images = Counter(
            "vaegan_images_total", "Images processed successfully, by method, model and version",
            ["method", *per_model], registry=r,
        )
        self.batch_size = Histogram(
            "vaegan_batch_size", "Images per merged model run (the dynamic batcher's batches)",
            per_model, buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "vaegan_queue_wait_seconds", "Time images wait in the batcher before their run starts",
            per_model, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference = Histogram(
            "vaegan_inference_seconds",
            "ONNX Runtime time per merged batch, by graph (forward = all three graphs)",
            ["graph", *per_model], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.outliers = Counter(
            "vaegan_outliers_total", "Images scored above their decision threshold", per_model, registry=r
        )
        self.scores = Histogram(
            "vaegan_outlier_score", "Distribution of outlier scores (drift shows here first)",
            per_model, buckets=SCORE_BUCKETS, registry=r,
        )
        self.model = Info("vaegan_model", "The served model and execution provider", registry=r)
        self.load_failures = Counter(
            "vaegan_model_load_failures_total", "Model versions that failed to load (bad bundle), by model",
            ["model"], registry=r,
        )
        self.inflight_pixels = Gauge(
            "vaegan_inflight_pixels", "Decoded pixels reserved by calls in progress (--max-inflight-pixels)",
            registry=r,
        )
        self.pixel_waiters = Gauge(
            "vaegan_inflight_pixels_waiting", "Calls waiting for room in --max-inflight-pixels", registry=r
        )

    def set_model(self, name: str, version: str, provider: str) -> None:
        self.model.info({"name": name, "version": version, "provider": provider})

    def observe_batch(self, n_images: int, timings: dict[str, float], model: tuple[str, str] = ("", "")) -> None:
        """One merged run of ``n_images`` of ``model`` (name, version); ``timings``: seconds by
        graph (and ``forward``)."""
        self.batch_size.labels(*model).observe(n_images)
        for graph, seconds in timings.items():
            self.inference.labels(graph, *model).observe(seconds)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Scrapes are not logged (one line per scrape every few seconds is noise)."""


@dataclass(frozen=True)
class MetricsSecurity:
    """TLS (PEM files; a client CA makes it mutual) and basic auth for /metrics; all optional."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    basic_auth: BasicAuth | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.cert_file is None or self.key_file is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            ctx.load_verify_locations(self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def wrap(self, app: WSGIApp) -> WSGIApp:
        auth = self.basic_auth
        if auth is None:
            return app

        def guarded(environ: dict[str, Any], start_response: Any) -> Any:
            if auth.check(environ.get("HTTP_AUTHORIZATION")):
                return app(environ, start_response)
            start_response(
                "401 Unauthorized",
                [("WWW-Authenticate", 'Basic realm="vaegan metrics"'), ("Content-Type", "text/plain")],
            )
            return [b"401 Unauthorized: /metrics needs basic auth\n"]

        return guarded


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP(S) server on a daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_endpoint(
    registry: CollectorRegistry, host: str, port: int, security: MetricsSecurity | None = None
) -> MetricsEndpoint:
    """Serve ``registry`` on ``http(s)://host:port/metrics``; port 0 picks a free one.

    With TLS the handshake runs in each connection's own thread (not in the accepting one), so
    a client that connects and stays silent cannot hold up other scrapes.
    """
    security = security or MetricsSecurity()
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    app = security.wrap(make_wsgi_app(registry))
    server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    ctx = security.ssl_context()
    if ctx is not None:
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, name="vaegan-metrics", daemon=True)
    thread.start()
    endpoint = MetricsEndpoint(server, thread)
    scheme = "https" if ctx is not None else "http"
    logger.info(
        "metrics on %s://%s:%d/metrics%s", scheme, host, endpoint.port,
        " (basic auth)" if security.basic_auth is not None else "",
    )
    return endpoint
