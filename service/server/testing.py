"""Run an :class:`OutlierServer` on its own event loop in a background thread.

For tests, notebooks and benchmarks that talk to a real server from synchronous code:

    with ServerThread(ServiceConfig(model=bundle, host="127.0.0.1", port=0, metrics_port=0)) as srv:
        client = OutlierClient(srv.target)
        ...
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from vaegan.service.runtime import Runtime
from vaegan.service.server.app import BoundPorts, OutlierServer
from vaegan.service.server.config import ServiceConfig

__all__ = ["ServerThread"]

T = TypeVar("T")


class ServerThread:
    """A server in a daemon thread. ``load=False`` starts it NOT_SERVING (call :meth:`load`)."""

    def __init__(self, config: ServiceConfig, runtime: Runtime | None = None, load: bool = True) -> None:
        self.config = config
        self._load = load
        self.loop = asyncio.new_event_loop()
        self.server = OutlierServer(config, runtime)
        self._thread = threading.Thread(target=self.loop.run_forever, name="vaegan-server", daemon=True)
        self.ports: BoundPorts | None = None

    def start(self) -> ServerThread:
        self._thread.start()
        self.ports = self.call(self.server.start())
        if self._load:
            self.load()
        return self

    def load(self) -> None:
        self.call(self.server.load())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return self.submit(coro).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule a coroutine on the server's loop; returns a concurrent Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @property
    def port(self) -> int:
        if self.ports is None:
            raise RuntimeError("the server is not started")
        return self.ports.grpc

    @property
    def metrics_port(self) -> int | None:
        return None if self.ports is None else self.ports.metrics

    @property
    def target(self) -> str:
        """``host:port`` for a client (the bind host, or 127.0.0.1 for a wildcard bind)."""
        host = self.config.host
        if host in ("[::]", "0.0.0.0", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = 0) -> None:
        if self._thread.is_alive():
            try:
                self.call(self.server.stop(grace))
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(timeout=10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sample_sum(registry: Any, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples ``name`` of a prometheus registry whose labels include ``labels``
    (the per-call series also carry the model and version, which callers may not care about)."""
    want = labels or {}
    total = 0.0
    for family in registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                total += s.value
    return total
