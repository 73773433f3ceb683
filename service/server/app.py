"""Server lifecycle: build, start (NOT_SERVING), load and warm up (SERVING), drain and stop.

    server = OutlierServer(config)
    ports = await server.start()   # gRPC + /metrics bound; health NOT_SERVING; RPCs UNAVAILABLE
    await server.load()            # bundle verified, sessions warm, batcher running; SERVING
    ...
    await server.stop(grace)       # NOT_SERVING, finish in-flight calls within grace, close

:func:`serve` does the first two steps. Three executors, sized on purpose: ``model_instances``
threads for ONNX Runtime (each run already uses ``intra_op_threads`` cores, so more threads
would only compete), ``decode_workers`` threads for decoding and inpainting, and
``respond_workers`` threads for scoring merged batches and encoding response pictures (kept
apart so that a flood of large decodes cannot delay answers that are ready). What the decode
pool may hold is bounded by ``--max-inflight-pixels``.

If the dynamic batcher's worker dies (a bug, an interpreter-level error), health turns
NOT_SERVING and :attr:`OutlierServer.fatal` is set: ``vaegan serve`` then exits non-zero so
that Kubernetes restarts the pod, rather than keep a process that answers UNAVAILABLE forever.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vaegan.protos.inference.v2 import grpc_predict_v2_pb2 as oip_pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.service.runtime import Runtime, ServiceError
from vaegan.service.runtime.bundle import MANIFEST
from vaegan.service.runtime.errors import FailedPrecondition, NotFound
from vaegan.service.server.auth import BasicAuth, TokenSet
from vaegan.service.server.batcher import DynamicBatcher
from vaegan.service.server.budget import InflightPixels
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.http import HttpEndpoint, build_app, start_http
from vaegan.service.server.interceptor import InstrumentedServicer, add_to_server
from vaegan.service.server.metrics import (
    MetricsEndpoint,
    MetricsSecurity,
    ServerMetrics,
    start_metrics_endpoint,
)
from vaegan.service.server.oip import OIP_SERVICE, OPEN_METHODS, InferenceServicer
from vaegan.service.server.pipeline import BatchRunner, concat_scored
from vaegan.service.server.repository import LoadedModel, VersionPolicy, scan_repository
from vaegan.service.server.servicer import SERVICE, SERVICE_NAME, OutlierServicer

__all__ = ["BoundPorts", "OutlierServer", "serve"]

logger = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)


@dataclass(frozen=True)
class BoundPorts:
    """The ports the server actually bound (useful when 0 = ephemeral was asked for)."""

    grpc: int
    metrics: int | None  # None: no metrics endpoint
    http: int | None = None  # None: no OIP HTTP/REST endpoint


class OutlierServer:
    """One gRPC server with health, reflection, metrics and (after :meth:`load`) a model."""

    def __init__(self, config: ServiceConfig, runtime: Runtime | None = None) -> None:
        self.config = config
        self.runtime = runtime  # preloaded runtime (tests, notebooks); else loaded from config
        self.metrics = ServerMetrics()
        self.ports: BoundPorts | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._endpoint: MetricsEndpoint | None = None
        self._http: HttpEndpoint | None = None
        self.fatal = asyncio.Event()  # set when the model can no longer serve (the batcher died)
        self.fatal_reason = ""
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="vaegan-load")  # loads and warm-ups
        self._pools: dict[int, ThreadPoolExecutor] = {}  # each model's batcher threads (ONNX Runtime)
        # retired versions and the task that closes each once its requests have finished
        self._retiring: dict[LoadedModel, asyncio.Future[None]] = {}
        self._poller: asyncio.Future[None] | None = None
        self._failed_stamp: dict[tuple[str, str], int] = {}  # failed versions, by manifest mtime
        self._policy = VersionPolicy.parse(config.version_policy)
        self._decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="vaegan-decode")
        self._respond_pool = ThreadPoolExecutor(config.respond_threads, thread_name_prefix="vaegan-respond")
        inflight = InflightPixels(config.max_inflight_pixels, self.metrics.inflight_pixels, self.metrics.pixel_waiters)
        self.servicer = OutlierServicer(config, self._decode_pool, self._respond_pool, self.metrics, inflight)
        self.inference = InferenceServicer(self.servicer, _version())
        self._draining = False
        self.inference.serving = lambda: not (self._draining or self.fatal.is_set())

    async def start(self) -> BoundPorts:
        """Bind and start gRPC (health NOT_SERVING) and /metrics; returns the bound ports."""
        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(
            options=options,
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs or None,
        )
        self._health = health.aio.HealthServicer()
        for name in HEALTH_SERVICES:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        tokens = TokenSet.load(cfg.auth_tokens_file) if cfg.auth_tokens_file is not None else None
        instrumented = InstrumentedServicer(self.servicer, SERVICE, self.metrics, tokens)
        add_to_server(instrumented, SERVICE, pb, server)
        oip = InstrumentedServicer(self.inference, OIP_SERVICE, self.metrics, tokens, open_methods=OPEN_METHODS)
        add_to_server(oip, OIP_SERVICE, oip_pb, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, OIP_SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if cfg.tls_cert_file is not None and cfg.tls_key_file is not None:
            client_ca = cfg.tls_client_ca_file.read_bytes() if cfg.tls_client_ca_file is not None else None
            creds = grpc.ssl_server_credentials(
                [(cfg.tls_key_file.read_bytes(), cfg.tls_cert_file.read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port(cfg.address, creds)
        else:
            port = server.add_insecure_port(cfg.address)  # raises RuntimeError if it cannot bind
        await server.start()
        self._server = server
        if cfg.metrics_port >= 0:
            security = MetricsSecurity(
                cfg.metrics_tls_cert_file, cfg.metrics_tls_key_file, cfg.metrics_tls_client_ca_file,
                BasicAuth.load(cfg.metrics_basic_auth_file) if cfg.metrics_basic_auth_file is not None else None,
            )
            self._endpoint = start_metrics_endpoint(self.metrics.registry, cfg.metrics_host, cfg.metrics_port, security)
        if cfg.http_port >= 0:
            app = build_app(self.inference, self.metrics, tokens, cfg.max_message_bytes)
            self._http = await start_http(app, cfg.host, cfg.http_port)
        self.ports = BoundPorts(
            port, self._endpoint.port if self._endpoint else None, self._http.port if self._http else None
        )
        logger.info("gRPC on %s:%d (NOT_SERVING until the model is warm)", cfg.host, port)
        return self.ports

    async def load(self) -> None:
        """Load the bundle (unless given) or the model repository's versions, each verified and
        warmed up at batch 1 and max batch size; then SERVING.

        Raises BundleError (or ValueError for an unusable provider choice) on a bad bundle. In a
        repository, a version that fails to load is logged and listed with its reason instead.
        """
        cfg = self.config
        if self._health is None:
            raise RuntimeError("OutlierServer.start() must run before load()")
        if self.runtime is not None or cfg.model_repository is None:
            rt = self.runtime
            if rt is None:
                rt = self.runtime = await self._in_loader(self._open, cfg.model)
            await self._bring_up(rt, rt.bundle.name, rt.bundle.version)
        else:
            if cfg.model_control_mode == "explicit":
                names = [n.strip() for n in cfg.load_models.split(",") if n.strip()]
            else:
                names = list(scan_repository(cfg.model_repository))
            for name in names:
                await self._sync_model(name, strict=cfg.model_control_mode == "explicit")
            if cfg.model_control_mode == "poll":
                self._poller = asyncio.ensure_future(self._poll())
            self.inference.control = self
        for name in HEALTH_SERVICES:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        loaded = ", ".join(f"{m.name} v{m.version}" for m in self.servicer.models.all()) or "no model yet"
        logger.info("SERVING %s (max batch %d, max delay %.1f ms)", loaded, cfg.max_batch_size, cfg.max_delay_ms)

    @property
    def model(self) -> LoadedModel | None:
        """The served model when there is one (the newest version of the only model)."""
        try:
            return self.servicer.models.resolve()
        except ServiceError:
            return None

    def _open(self, path: Path) -> Runtime:
        cfg = self.config
        return Runtime.load(
            path, providers=cfg.providers, intra_op_threads=cfg.ort_threads, max_batch_size=cfg.max_batch_size,
            spin=cfg.ort_spin, fuse=cfg.fuse_graphs,
        )

    async def _in_loader(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._loader, functools.partial(fn, *args))

    async def _bring_up(self, rt: Runtime, name: str, version: str) -> LoadedModel:
        """Warm ``rt`` up through its batch runner and start its batcher; then it is served."""
        cfg = self.config
        s, runner = rt.spec, BatchRunner(rt)
        warm = np.zeros((cfg.max_batch_size, s.height, s.width, s.channels), np.uint8)  # (N, H, W, C)
        runner.score(await self._in_loader(runner, warm, {}))
        pool = ThreadPoolExecutor(cfg.model_instances, thread_name_prefix=f"vaegan-ort-{name}")
        batcher = DynamicBatcher(
            runner, pool, concat=concat_scored, finish=runner.score,
            finish_executor=self._respond_pool, max_batch_size=cfg.max_batch_size,
            max_delay_s=cfg.max_delay_ms / 1e3, instances=cfg.model_instances, metrics=self.metrics,
            on_death=self._batcher_died, labels=(name, version),
        )
        batcher.start()
        model = LoadedModel(rt, batcher, name, version)
        self._pools[id(model)] = pool
        self.servicer.attach(model)
        self.metrics.set_model(name, version, rt.provider)
        if self._health is not None:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("loaded %s version %s on %s", name, version, rt.provider)
        return model

    # ---- the model repository --------------------------------------------------------------
    async def _sync_model(self, name: str, strict: bool = False) -> None:
        """Bring ``name`` to what the repository and the version policy say: load the versions
        that should be served (each only once verified and warm), then retire the others. A
        version that fails to load is recorded with its reason; what serves keeps serving."""
        repo = self.config.model_repository
        assert repo is not None
        versions = scan_repository(repo).get(name, [])
        if strict and not versions:
            raise NotFound(f"model {name!r}: no {repo}/{name}/<version>/ with a bundle in it")
        wanted = self._policy.select(versions)
        models = self.servicer.models
        for version in wanted:
            key = (name, version)
            manifest = repo / name / version / MANIFEST
            stamp = manifest.stat().st_mtime_ns if manifest.exists() else 0
            if version in models.models.get(name, {}) or self._failed_stamp.get(key) == stamp:
                continue  # served already, or failed and unchanged since
            models.loading.add(key)
            try:
                rt = await self._in_loader(self._open, repo / name / version)
                await self._bring_up(rt, name, version)
                self._failed_stamp.pop(key, None)
            except Exception as e:  # noqa: BLE001 - any bad bundle: refused, the rest serves on
                reason = f"{type(e).__name__}: {e}" if not isinstance(e, ServiceError) else str(e)
                models.failed[key] = reason
                self._failed_stamp[key] = stamp
                self.metrics.load_failures.labels(name).inc()
                logger.error("model %s version %s not loaded: %s", name, version, reason)
                if strict and not models.models.get(name):
                    raise FailedPrecondition(f"model {name!r} version {version} did not load: {reason}") from None
            finally:
                models.loading.discard(key)
        for version in list(models.models.get(name, {})):
            if version not in wanted and any(v in models.models.get(name, {}) for v in wanted):
                await self._retire(name, version, wait=False)
        for key in [k for k in models.failed if k[0] == name and k[1] not in versions]:
            models.failed.pop(key)  # its folder is gone

    async def _retire(self, name: str, version: str, wait: bool) -> None:
        """New requests stop getting this version at once; it is closed once the requests
        using it have finished (``wait``: return only then)."""
        model = self.servicer.models.retire(name, version)
        if model is None:
            return
        if not self.servicer.models.models.get(name) and self._health is not None:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("retiring %s version %s (%d requests in flight)", name, version, model.active)
        task = self._retiring[model] = asyncio.ensure_future(self._close_when_idle(model))
        if wait:
            await task

    async def _close_when_idle(self, model: LoadedModel) -> None:
        try:
            await asyncio.wait_for(model.idle.wait(), timeout=max(self.config.grace_seconds, 1.0))
        except asyncio.TimeoutError:
            logger.warning("%s version %s: requests still in flight after the grace period; closing", model.name, model.version)
        model.batcher.drain()
        await model.batcher.close()
        self._retiring.pop(model, None)
        pool = self._pools.pop(id(model), None)
        if pool is not None:
            pool.shutdown(wait=False)
        logger.info("unloaded %s version %s", model.name, model.version)

    async def _poll(self) -> None:
        repo = self.config.model_repository
        assert repo is not None
        while True:
            await asyncio.sleep(self.config.repository_poll_secs)
            try:
                on_disk = scan_repository(repo)
                for name in sorted(set(on_disk) | set(self.servicer.models.models)):
                    if name in on_disk:
                        await self._sync_model(name)
                    else:
                        for version in list(self.servicer.models.models.get(name, {})):
                            await self._retire(name, version, wait=False)
            except Exception as e:  # noqa: BLE001 - a bad scan must not stop polling
                logger.error("model repository poll failed: %s: %s", type(e).__name__, e)

    async def load_model(self, name: str) -> None:
        """Explicit model control: load (or reload) ``name``'s versions from the repository."""
        if self.config.model_repository is None:
            raise FailedPrecondition("this server has no model repository (--model-repository)")
        self._failed_stamp = {k: v for k, v in self._failed_stamp.items() if k[0] != name}  # retry
        await self._sync_model(name, strict=True)

    async def unload_model(self, name: str) -> None:
        """Explicit model control: stop serving ``name``; returns once its requests finished."""
        versions = list(self.servicer.models.models.get(name, {}))
        if not versions:
            raise NotFound(f"model {name!r} is not loaded")
        for version in versions:
            await self._retire(name, version, wait=True)

    def _batcher_died(self, exc: BaseException) -> None:
        """On the event loop: the model cannot serve any more. Health NOT_SERVING (probes and
        load balancers stop sending), and ``fatal`` set for the process to exit non-zero."""
        self.fatal_reason = f"the dynamic batcher stopped ({type(exc).__name__}: {exc})"
        logger.critical("%s: NOT_SERVING; the process should exit and be restarted", self.fatal_reason)
        if self._health is not None:
            for name in HEALTH_SERVICES:
                asyncio.ensure_future(self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))
        self.fatal.set()

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish within ``grace`` s, close."""
        self._draining = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()  # every service NOT_SERVING
        if self._poller is not None:
            self._poller.cancel()
        for m in self.servicer.models.all():
            m.batcher.drain()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._http is not None:  # readiness is already 503; in-flight HTTP calls finish
            await self._http.close()
            self._http = None
        for task in self._retiring.values():
            task.cancel()
        for m in [*self.servicer.models.all(), *self._retiring]:  # no batcher thread outlives the server
            m.batcher.drain()
            await m.batcher.close()
        self._retiring.clear()
        self.servicer.attach(None)
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._respond_pool.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools.clear()
        logger.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _version() -> str:
    """The installed vaegan version (ServerMetadata), or "unknown" when run from a source tree."""
    from importlib import metadata

    try:
        return metadata.version("vaegan")
    except metadata.PackageNotFoundError:
        return "unknown"


async def serve(config: ServiceConfig, runtime: Runtime | None = None) -> OutlierServer:
    """Start a server and load its model; returns it SERVING (its ``ports`` are bound).

    On a bad bundle the server is stopped again and the error raised.
    """
    server = OutlierServer(config, runtime)
    await server.start()
    try:
        await server.load()
    except BaseException:
        await server.stop(0)
        raise
    return server
