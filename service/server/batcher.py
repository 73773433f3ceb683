"""Dynamic batching: merge concurrent requests into one ONNX Runtime run per merged batch.

As Triton's dynamic batcher: requests queue up; when a model instance is free, it takes the
queued images in arrival order up to ``max_batch_size``, waiting at most ``max_delay_s`` after
the oldest one arrived for the batch to fill. Under load, the queue fills while the model runs,
so batches form with no added delay. The merged batch goes through ``run`` once (the server's
:class:`~service.server.pipeline.BatchRunner`: one
:meth:`Runtime.forward_images <service.runtime.Runtime.forward_images>` call), and each request gets its own
rows back, in order. A request larger than ``max_batch_size`` is split into chunks, which may
share runs with other requests. Per-image classes (a conditional model's ``Image.class_id``)
travel with their images: merged in the same order, -1 for the images of requests that sent none.

Each model instance is a worker thread (on the given executor) that collects its next batch
*itself*, from a thread-safe queue, the moment its previous run ends. The event loop only
enqueues requests and hands results back (one callback per merged batch): a busy loop, with
hundreds of gRPC calls to serve, never stands between the model and its next batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from vaegan.service.runtime import ModelNotReady
from vaegan.service.server.metrics import ServerMetrics

__all__ = ["Batched", "DynamicBatcher"]

logger = logging.getLogger(__name__)


class Batched(Protocol):
    """A batch result: slicing along the batch axis gives each request its rows."""

    def __getitem__(self, s: slice) -> Batched: ...


Out = TypeVar("Out", bound=Batched)


@dataclass
class _Item(Generic[Out]):
    x: np.ndarray  # (n, ...) with n <= max_batch_size
    future: asyncio.Future[Out]
    enqueued: float  # time.monotonic() at arrival
    classes: np.ndarray | None = None  # int64 (n,): each image's class, -1 = none asked for


class DynamicBatcher(Generic[Out]):
    """Merges :meth:`infer` calls from many coroutines into batched ``run`` calls.

    ``run(x, timings)`` takes the merged inputs (N, ...) and returns a result whose slices are
    each request's rows (e.g. :meth:`Runtime.forward <service.runtime.Runtime.forward>` and
    :class:`~service.runtime.Forward`); it may fill ``timings`` (name -> seconds) for the
    metrics. When a request in the merged batch came with classes (:meth:`infer`), it is called
    as ``run(x, timings, classes)`` with the merged int64 (N,) classes (-1 for images without). ``concat`` joins the parts of a request that was split over several runs.
    ``finish(out)``, if given, post-processes each merged result on ``finish_executor`` while
    the model already runs the next batch (a two-stage pipeline). ``instances`` worker threads
    run on ``executor`` from :meth:`start` to :meth:`close` (it needs that many threads free).
    """

    def __init__(
        self,
        run: Callable[..., Out],
        executor: Executor,
        *,
        concat: Callable[[list[Out]], Out],
        finish: Callable[[Out], Out] | None = None,
        finish_executor: Executor | None = None,
        max_batch_size: int = 64,
        max_delay_s: float = 0.002,
        instances: int = 1,
        metrics: ServerMetrics | None = None,
        on_death: Callable[[BaseException], None] | None = None,
        labels: tuple[str, str] = ("", ""),
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
        self.on_death = on_death  # called on the event loop if a worker thread dies
        self.labels = labels  # (model name, version) of the metrics
        self._cond = threading.Condition()  # guards the queue and the flags below
        self._queue: collections.deque[_Item[Out]] = collections.deque()
        self._queued_images = 0
        self._draining = False  # run what is queued without waiting for batches to fill
        self._closing = False  # workers exit once the queue is empty
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[concurrent.futures.Future[None]] = []
        self._finishing: set[concurrent.futures.Future[None]] = set()

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker threads; results come back to the running event loop."""
        if self._workers:
            return
        self._loop = asyncio.get_running_loop()
        self._workers = [self.executor.submit(self._worker) for _ in range(self.instances)]

    def drain(self) -> None:
        """Stop waiting for batches to fill: run what is queued at once (shutdown)."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    async def close(self) -> None:
        """Stop the workers; queued requests fail with UNAVAILABLE, running batches finish."""
        with self._cond:
            self._draining = self._closing = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued_images = 0
            self._cond.notify_all()
        for item in pending:
            if not item.future.done():
                item.future.set_exception(ModelNotReady("the server is shutting down"))
        # a worker exits after handing over its last batch (a dead one has logged its error)
        await asyncio.gather(*(asyncio.wrap_future(w) for w in self._workers), return_exceptions=True)
        while self._finishing:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in self._finishing.copy()), return_exceptions=True)
        await asyncio.sleep(0)  # let the results posted to the loop be delivered
        self._workers = []

    # ---- the API ------------------------------------------------------------------------
    async def infer(self, x: np.ndarray, classes: np.ndarray | None = None) -> Out:
        """``run(x)`` for a batch (N, ...), merged with other calls' inputs. ``classes``: int64
        (N,), a class per image (-1: none), carried through the merge with the images."""
        if classes is not None and len(classes) != len(x):
            raise ValueError(f"{len(classes)} classes for {len(x)} images")
        if not self._workers or self._closing or any(w.done() for w in self._workers):
            raise ModelNotReady("the model is not serving")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        with self._cond:
            for start in range(0, len(x), self.max_batch_size):
                chunk = x[start : start + self.max_batch_size]  # (n <= max_batch_size, ...)
                labels = None if classes is None else classes[start : start + self.max_batch_size]
                future: asyncio.Future[Out] = loop.create_future()
                self._queue.append(_Item(chunk, future, now, labels))
                self._queued_images += len(chunk)
                futures.append(future)
            self._cond.notify()
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

    # ---- the worker threads -------------------------------------------------------------
    def _collect(self) -> list[_Item[Out]] | None:
        """The next batch: queued items in order, up to max_batch_size images (None: exit)."""
        with self._cond:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                deadline = self._queue[0].enqueued + self.max_delay_s
                while not self._draining and self._queued_images < self.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
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

    def _worker(self) -> None:
        try:
            while (batch := self._collect()) is not None:
                try:
                    self._process(batch)
                except Exception as e:  # every waiter gets the failure; the worker goes on
                    self._post(self._fail, batch, e)
                except BaseException:
                    self._post(self._fail, batch, ModelNotReady("the model is not serving: its batcher stopped"))
                    raise
        except BaseException as e:  # a bug or an interpreter-level error: no silent half-server
            self._died(e)
            raise

    def _died(self, exc: BaseException) -> None:
        """A worker thread is ending on an error: refuse new work, fail what is queued, and
        tell the owner (the server flips health to NOT_SERVING and exits non-zero)."""
        logger.critical("dynamic batcher worker died: %s: %s", type(exc).__name__, exc)
        with self._cond:
            self._closing = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued_images = 0
            self._cond.notify_all()
        self._post(self._fail, pending, ModelNotReady("the model is not serving: its batcher stopped"))
        if self.on_death is not None:
            self._post(self.on_death, exc)

    def _process(self, batch: list[_Item[Out]]) -> None:
        """Run one merged batch and hand it to the finish stage (or straight to the loop)."""
        started = time.monotonic()
        x = batch[0].x if len(batch) == 1 else np.concatenate([it.x for it in batch])  # (N, ...)
        timings: dict[str, float] = {}
        if all(it.classes is None for it in batch):
            out = self.run(x, timings)
        else:  # (N,): each request's classes, -1 for the images of requests without
            classes = np.concatenate([np.full(len(it.x), -1, np.int64) if it.classes is None else it.classes for it in batch])
            out = self.run(x, timings, classes)  # type: ignore[call-arg]
        if self.metrics is not None:
            for it in batch:
                self.metrics.queue_wait.labels(*self.labels).observe(started - it.enqueued)
            self.metrics.observe_batch(len(x), timings, self.labels)
        logger.debug("ran a batch of %d from %d requests in %.1f ms", len(x), len(batch),
                     (time.monotonic() - started) * 1e3)
        if self.finish is not None and self.finish_executor is not None:
            job = self.finish_executor.submit(self._finish, batch, out)
            self._finishing.add(job)
            job.add_done_callback(self._finishing.discard)
        else:
            self._finish(batch, out)

    def _finish(self, batch: list[_Item[Out]], out: Out) -> None:
        """Post-process (``finish``), cut into each request's rows, hand over to the loop."""
        try:
            if self.finish is not None:
                out = self.finish(out)
            parts, offset = [], 0
            for it in batch:
                parts.append(out[offset : offset + len(it.x)])
                offset += len(it.x)
        except Exception as e:
            self._post(self._fail, batch, e)
            return
        self._post(self._deliver, batch, parts)

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            logger.debug("batch result dropped: the event loop is closed")

    # ---- on the event loop --------------------------------------------------------------
    @staticmethod
    def _deliver(batch: list[_Item[Out]], parts: list[Out]) -> None:
        for it, part in zip(batch, parts, strict=True):
            if not it.future.done():
                it.future.set_result(part)

    @staticmethod
    def _fail(batch: list[_Item[Out]], exc: Exception) -> None:
        for it in batch:
            if not it.future.done():
                it.future.set_exception(exc)
