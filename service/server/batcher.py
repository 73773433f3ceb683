"""Dynamic batching: merge concurrent requests into one ONNX Runtime run per graph.

As Triton's dynamic batcher: requests queue up; when a model instance is free, the batcher takes
the queued images in arrival order up to ``max_batch_size``, waiting at most ``max_delay_s``
after the oldest one arrived for the batch to fill. Under load, the queue fills while the model
runs, so batches form with no added delay. The merged batch goes through ``run`` once on an
executor thread (the server's :class:`~service.server.pipeline.BatchRunner`: one
:meth:`Runtime.forward <service.runtime.Runtime.forward>` call, i.e. one run per graph), and
each request gets its own rows back, in order. A request larger than
``max_batch_size`` is split into chunks, which may share runs with other requests.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from service.runtime import Forward, ModelNotReady
from service.server.metrics import ServerMetrics

__all__ = ["Batched", "DynamicBatcher", "concat_forwards"]

logger = logging.getLogger(__name__)


class Batched(Protocol):
    """A batch result: slicing along the batch axis gives each request its rows."""

    def __getitem__(self, s: slice) -> Batched: ...


Out = TypeVar("Out", bound=Batched)


def concat_forwards(parts: list[Forward]) -> Forward:
    """Concatenate Forwards along the batch axis (the inverse of slicing)."""
    return Forward.concat(parts)


@dataclass
class _Item(Generic[Out]):
    x: np.ndarray  # (n, ...) with n <= max_batch_size
    future: asyncio.Future[Out]
    enqueued: float  # loop.time() at arrival


class DynamicBatcher(Generic[Out]):
    """Merges :meth:`infer` calls from many coroutines into batched ``run`` calls.

    ``run(x, timings)`` takes the merged inputs (N, ...) and returns a result whose slices are
    each request's rows (e.g. :meth:`Runtime.forward <service.runtime.Runtime.forward>` and
    :class:`~service.runtime.Forward`); it may fill ``timings`` (name -> seconds) for the
    metrics. ``concat`` joins the parts of a request that was split over several runs.
    ``finish(out)``, if given, post-processes each merged result on ``finish_executor`` while
    the model already runs the next batch (a two-stage pipeline).
    """

    def __init__(
        self,
        run: Callable[[np.ndarray, dict[str, float]], Out],
        executor: Executor,
        *,
        concat: Callable[[list[Out]], Out],
        finish: Callable[[Out], Out] | None = None,
        finish_executor: Executor | None = None,
        max_batch_size: int = 64,
        max_delay_s: float = 0.002,
        instances: int = 1,
        metrics: ServerMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or instances < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and instances must be >= 1, max_delay_s >= 0")
        self.run = run
        self.concat = concat
        self.finish = finish
        self.finish_executor = finish_executor
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.instances = instances
        self.metrics = metrics
        self._queue: collections.deque[_Item[Out]] = collections.deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(instances)
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._draining = False

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    def drain(self) -> None:
        """Stop waiting for batches to fill: run what is queued at once (shutdown)."""
        self._draining = True
        self._wakeup.set()

    async def close(self) -> None:
        """Stop the loop; queued requests fail with UNAVAILABLE, running batches finish."""
        self.drain()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(ModelNotReady("the server is shutting down"))
        self._queued_images = 0
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    # ---- the API ------------------------------------------------------------------------
    async def infer(self, x: np.ndarray) -> Out:
        """``run(x)`` for a batch (N, ...), merged with other calls' inputs."""
        if self._task is None or self._task.done():
            raise ModelNotReady("the model is not serving")
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for start in range(0, len(x), self.max_batch_size):
            chunk = x[start : start + self.max_batch_size]  # (n <= max_batch_size, ...)
            future: asyncio.Future[Out] = loop.create_future()
            self._queue.append(_Item(chunk, future, now))
            self._queued_images += len(chunk)
            futures.append(future)
        self._wakeup.set()
        if len(futures) == 1:
            return await futures[0]  # cancelling the caller cancels the future
        try:
            parts = await asyncio.gather(*futures)
        except BaseException:
            for f in futures:  # cancel the rest; mark failures as seen (no "never retrieved")
                if not f.done():
                    f.cancel()
                elif not f.cancelled():
                    f.exception()
            raise
        return self.concat(list(parts))

    # ---- the loop -----------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()  # released by _run once its model run is over
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for a new item (or drain); False on timeout."""
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _collect(self) -> list[_Item[Out]]:
        """The next batch: queued items in order, up to max_batch_size images."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                await self._wait(None)
            deadline = self._queue[0].enqueued + self.max_delay_s
            while not self._draining and self._queued_images < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await self._wait(remaining):
                    break
            batch: list[_Item[Out]] = []
            size = 0
            while self._queue and size + len(self._queue[0].x) <= self.max_batch_size:
                item = self._queue.popleft()
                self._queued_images -= len(item.x)
                if not item.future.done():  # skip requests cancelled while queued
                    batch.append(item)
                    size += len(item.x)
            if batch:
                return batch

    async def _run(self, batch: list[_Item[Out]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        x = batch[0].x if len(batch) == 1 else np.concatenate([it.x for it in batch])  # (N, ...)
        try:
            try:
                out, seconds, timings = await loop.run_in_executor(self.executor, self._timed, x)
            finally:
                self._slots.release()  # the model is free: the next batch may start
            if self.finish is not None:
                out = await loop.run_in_executor(self.finish_executor, self.finish, out)
        except BaseException as e:  # every waiter gets the failure; the loop goes on
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        if self.metrics is not None:
            for it in batch:
                self.metrics.queue_wait.observe(started - it.enqueued)
            self.metrics.observe_batch(len(x), timings)
        offset = 0
        for it in batch:
            n = len(it.x)
            if not it.future.done():
                it.future.set_result(out[offset : offset + n])  # type: ignore[arg-type]
            offset += n
        logger.debug("ran a batch of %d from %d requests in %.1f ms", len(x), len(batch), seconds * 1e3)

    def _timed(self, x: np.ndarray) -> tuple[Out, float, dict[str, float]]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        out = self.run(x, timings)
        return out, time.perf_counter() - t0, timings
