"""The server-wide budget of decoded pixels in flight (``--max-inflight-pixels``).

``--max-request-pixels`` bounds one request; this bounds all of them together. A request
reserves the pixels its headers declare before anything is decoded and gives them back when
its call ends (answered, refused, cancelled or timed out), so the decoded originals held by
the whole server never exceed the budget however many clients send large images at once.
A request that does not fit waits, first come first served, until earlier calls finish;
its deadline still applies (gRPC cancels the wait). The event loop owns the budget: no locks.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Gauge

from vaegan.service.runtime import ResourceExhausted

__all__ = ["InflightPixels"]


class InflightPixels:
    """Pixels reserved by calls in progress; waiters are served in arrival order."""

    def __init__(self, limit: int, gauge: Gauge | None = None, waiting: Gauge | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._gauge = gauge
        self._waiting = waiting

    @asynccontextmanager
    async def reserve(self, pixels: int, where: str = "request") -> AsyncIterator[None]:
        """Hold ``pixels`` for the body of the ``async with``; waits while they do not fit."""
        await self.acquire(pixels, where)
        try:
            yield
        finally:
            self.release(pixels)

    async def acquire(self, pixels: int, where: str = "request") -> None:
        if pixels > self.limit:
            raise ResourceExhausted(
                f"{where}: {pixels} pixels is more than the server decodes at once "
                f"({self.limit}, --max-inflight-pixels)"
            )
        if not self._waiters and self.used + pixels <= self.limit:
            self._take(pixels)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, fut)
        self._waiters.append(entry)
        self._count_waiting()
        try:
            await fut  # _wake takes the pixels for us before setting the result
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(pixels)  # granted and cancelled in the same tick: give it back
            else:
                self._waiters.remove(entry)
                self._wake()  # a large waiter leaving may let smaller ones behind it in
            raise
        finally:
            self._count_waiting()

    def release(self, pixels: int) -> None:
        self.used -= pixels
        self._set_gauge()
        self._wake()

    def _take(self, pixels: int) -> None:
        self.used += pixels
        self._set_gauge()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            pixels, fut = self._waiters.popleft()
            if not fut.done():
                self._take(pixels)
                fut.set_result(None)

    def _set_gauge(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.used)

    def _count_waiting(self) -> None:
        if self._waiting is not None:
            self._waiting.set(len(self._waiters))
