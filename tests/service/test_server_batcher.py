"""The dynamic batcher on a fake forward: merging, splitting, order, delay, cancellation, errors."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vaegan.service.runtime import Forward
from vaegan.service.server.batcher import DynamicBatcher


class FakeModel:
    """forward(x): x_hat = x + 1; records every batch size it saw."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.fail_on = fail_on

    def __call__(self, x: np.ndarray, timings: dict[str, float]) -> Forward:
        self.batches.append(len(x))
        if self.fail_on is not None and len(x) == self.fail_on:
            raise RuntimeError("boom")
        time.sleep(self.delay)
        timings["encoder"] = self.delay
        n = len(x)
        return Forward(x, x + 1, np.zeros((n, 1), np.float32), x.reshape(n, -1), x.reshape(n, -1))


def _x(n: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + start).reshape(n, 1, 1, 1)  # (n, C, H, W)


def _run(coro_fn, model: FakeModel, **kw):
    """``coro_fn(batcher)`` on a started batcher (with ``finish``: on its own executor)."""
    async def main():
        with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as post:
            if "finish" in kw:
                kw["finish_executor"] = post
            batcher = DynamicBatcher(model, pool, concat=Forward.concat, **kw)
            batcher.start()
            try:
                return await coro_fn(batcher)
            finally:
                await batcher.close()

    return asyncio.run(main())


def test_concurrent_requests_are_merged_and_split_back_in_order() -> None:
    model = FakeModel()

    async def go(b: DynamicBatcher):
        return await asyncio.gather(*(b.infer(_x(1, 10.0 * i)) for i in range(12)))

    outs = _run(go, model, max_batch_size=8, max_delay_s=0.05)
    for i, fwd in enumerate(outs):
        np.testing.assert_array_equal(fwd.x_hat.ravel(), [10.0 * i + 1])
    assert sum(model.batches) == 12 and max(model.batches) == 8 and len(model.batches) == 2


def test_a_request_larger_than_the_max_batch_is_split() -> None:
    model = FakeModel()

    async def go(b: DynamicBatcher):
        return await b.infer(_x(21))

    fwd = _run(go, model, max_batch_size=8, max_delay_s=0.0)
    np.testing.assert_array_equal(fwd.x_hat.ravel(), np.arange(21) + 1)
    assert model.batches == [8, 8, 5]


def test_a_lone_request_waits_at_most_max_delay() -> None:
    model = FakeModel()

    async def go(b: DynamicBatcher):
        t0 = time.perf_counter()
        await b.infer(_x(1))
        return time.perf_counter() - t0

    elapsed = _run(go, model, max_batch_size=64, max_delay_s=0.05)
    assert 0.04 <= elapsed < 0.5
    assert model.batches == [1]


def test_cancelled_requests_are_not_run() -> None:
    model = FakeModel()

    async def go(b: DynamicBatcher):
        doomed = asyncio.ensure_future(b.infer(_x(3)))
        await asyncio.sleep(0)
        doomed.cancel()
        return await b.infer(_x(2, 100.0))

    fwd = _run(go, model, max_batch_size=8, max_delay_s=0.02)
    np.testing.assert_array_equal(fwd.x.ravel(), [100.0, 101.0])
    assert model.batches == [2]


def test_a_failed_run_fails_its_requests_and_the_batcher_goes_on() -> None:
    model = FakeModel(fail_on=3)

    async def go(b: DynamicBatcher):
        with pytest.raises(RuntimeError, match="boom"):
            await b.infer(_x(3))
        return await b.infer(_x(2))

    fwd = _run(go, model, max_batch_size=8, max_delay_s=0.0)
    assert len(fwd.x) == 2


def test_concat_forwards_inverts_slicing() -> None:
    f = FakeModel()(_x(5), {})
    joined = Forward.concat([f[0:2], f[2:5]])
    for name in ("x", "x_hat", "logit", "feat_x", "feat_xhat"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(f, name))


def test_finish_stage_post_processes_each_merged_batch() -> None:
    model = FakeModel()

    def finish(f: Forward) -> Forward:
        return Forward(f.x, f.x_hat + 100, f.logit, f.feat_x, f.feat_xhat)

    async def go(b: DynamicBatcher):
        return await asyncio.gather(b.infer(_x(3)), b.infer(_x(2, 10.0)))

    first, second = _run(go, model, finish=finish, max_batch_size=4, max_delay_s=0.02)
    np.testing.assert_array_equal(first.x_hat.ravel(), [101, 102, 103])
    np.testing.assert_array_equal(second.x_hat.ravel(), [111, 112])
    assert model.batches == [3, 2]


def test_the_model_takes_its_next_batch_while_the_event_loop_is_busy() -> None:
    """Workers collect batches themselves: a blocked loop does not keep the model idle."""
    model = FakeModel(delay=0.05)
    starts: list[float] = []
    original = model.__call__

    def timed(x: np.ndarray, timings: dict[str, float]) -> Forward:
        starts.append(time.perf_counter())
        return original(x, timings)

    async def go(b: DynamicBatcher):
        first = asyncio.ensure_future(b.infer(_x(1)))
        await asyncio.sleep(0.01)  # the first batch is running
        second = asyncio.ensure_future(b.infer(_x(1, 5.0)))
        await asyncio.sleep(0)  # queued
        blocked_from = time.perf_counter()
        time.sleep(0.3)  # the event loop is stuck (a slow callback): the model is not
        blocked_to = time.perf_counter()
        out = await asyncio.gather(first, second)
        return out, blocked_from, blocked_to

    (a, b2), t0, t1 = _run(go, timed, max_batch_size=1, max_delay_s=0.0)  # type: ignore[arg-type]
    assert len(starts) == 2 and t0 < starts[1] < t1  # the second run began during the block
    np.testing.assert_array_equal(b2.x_hat.ravel(), [6.0])


def test_close_finishes_running_batches_and_fails_queued_ones() -> None:
    from vaegan.service.runtime import ModelNotReady

    model = FakeModel(delay=0.1)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(model, pool, concat=Forward.concat, max_batch_size=1, max_delay_s=0.0)
            b.start()
            running = asyncio.ensure_future(b.infer(_x(1, 1.0)))
            await asyncio.sleep(0.02)
            queued = asyncio.ensure_future(b.infer(_x(1, 2.0)))
            await asyncio.sleep(0)
            await b.close()
            results = await asyncio.gather(running, queued, return_exceptions=True)
            with pytest.raises(ModelNotReady):
                await b.infer(_x(1))
            return results

    done, failed = asyncio.run(main())
    np.testing.assert_array_equal(done.x_hat.ravel(), [2.0])
    assert isinstance(failed, ModelNotReady) and "shutting down" in str(failed)
    assert model.batches == [1]


def test_a_failed_finish_stage_fails_its_requests_and_the_worker_goes_on() -> None:
    model = FakeModel()
    calls = {"n": 0}

    def finish(f: Forward) -> Forward:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("scoring broke")
        return f

    async def go(b: DynamicBatcher):
        with pytest.raises(ValueError, match="scoring broke"):
            await b.infer(_x(2))
        return await b.infer(_x(3, 7.0))

    fwd = _run(go, model, finish=finish, max_batch_size=4, max_delay_s=0.0)
    np.testing.assert_array_equal(fwd.x_hat.ravel(), [8.0, 9.0, 10.0])
    assert model.batches == [2, 3]
