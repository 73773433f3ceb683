"""Decoding and resizing in worker processes, in order, with a bounded number of chunks in flight.

:func:`decode_chunk` runs in a worker: it reads one model batch worth of files with the
runtime's own preprocessing (:mod:`service.runtime.preprocess`), so a batch job sees every image
exactly as the server would. :class:`DecodePool` keeps at most ``window`` chunks submitted and
not yet consumed, so memory does not grow with the corpus however far the decoders run ahead
of the model. This module imports numpy and Pillow only (workers start fast and small).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from vaegan.service.runtime.errors import InvalidInput
from vaegan.service.runtime.preprocess import ImageSpec, decode_image, match_channels, to_model_size

__all__ = ["DecodePool", "DecodeWorkerDied", "Decoded", "decode_chunk", "default_workers"]


class DecodeWorkerDied(RuntimeError):
    """A decode worker process ended abruptly (killed, out of memory, a crash in a decoder)."""


@dataclass
class Decoded:
    """One chunk of files after decoding: the images that decoded, at model size, and an error
    message for each one that did not. ``ok[j]`` is the position in the chunk of ``batch[j]``."""

    n: int  # files in the chunk
    ok: list[int]  # positions (0..n-1) that decoded, in order
    batch: np.ndarray  # uint8 (len(ok), H, W, C) at model size
    sizes: np.ndarray  # int64 (len(ok), 2): each decoded input's (height, width)
    conversions: list[str]  # per decoded image, one of preprocess.CONVERSIONS
    errors: dict[int, str] = field(default_factory=dict)  # position -> what was wrong
    originals: list[np.ndarray] | None = None  # uint8 (h, w, C) at input size, when kept


def default_workers() -> int:
    """Cores available to this process, minus one for the model (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def decode_chunk(paths: list[str], spec: ImageSpec, keep_originals: bool = False) -> Decoded:
    """Read, decode, match channels and fit each file to the model; a file that fails becomes
    an error message and the rest go on."""
    n = len(paths)
    batch = np.empty((n, spec.height, spec.width, spec.channels), np.uint8)
    sizes = np.empty((n, 2), np.int64)
    ok: list[int] = []
    conversions: list[str] = []
    errors: dict[int, str] = {}
    originals: list[np.ndarray] | None = [] if keep_originals else None
    for i, path in enumerate(paths):
        try:
            arr = decode_image(path, where="image")
            size = arr.shape[:2]
            arr, kind = match_channels(arr, spec.channels, where="image")
            small = to_model_size(arr, spec)
        except InvalidInput as e:
            errors[i] = str(e).removeprefix("image: ")
            continue
        except Exception as e:  # noqa: BLE001 - any decoder failure is this file's error row
            errors[i] = f"cannot decode {path} ({type(e).__name__}: {e})"
            continue
        batch[len(ok)] = small
        sizes[len(ok)] = size
        ok.append(i)
        conversions.append(kind)
        if originals is not None:
            originals.append(arr)
    k = len(ok)
    return Decoded(n, ok, batch[:k], sizes[:k], conversions, errors, originals)


def _exit_with(job_pid: int) -> None:
    """Worker initializer: a watchdog thread that ends this worker once the job process is gone,
    so a job killed outright (SIGKILL) leaves no decoder running."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(job_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # alive, owned by someone else: cannot happen for our parent
                pass

    threading.Thread(target=watch, name="vaegan-job-watchdog", daemon=True).start()


def _result(future: Future[Decoded]) -> Decoded:
    try:
        return future.result()
    except BrokenProcessPool as e:
        raise DecodeWorkerDied(
            f"a decode worker process died ({e}); what was committed is kept: run again with --resume, "
            "and with --workers 0 if it happens again (decoding in the job's own process)"
        ) from e


class DecodePool:
    """Decode chunks of paths in ``workers`` processes (0: in this process), yielding
    :class:`Decoded` in the order the chunks were given, with at most ``window`` chunks in
    flight (default ``2 * workers + 1``).

    Workers are started with ``forkserver`` where available (never forked from a process whose
    ONNX Runtime threads are running). Use as a context manager.
    """

    def __init__(self, spec: ImageSpec, workers: int, keep_originals: bool = False, window: int | None = None) -> None:
        self.spec = spec
        self.workers = max(0, workers)
        self.keep_originals = keep_originals
        self.window = window or 2 * self.workers + 1
        self._executor: ProcessPoolExecutor | None = None
        if self.workers > 0:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload([__name__])  # workers fork from a server that has this module
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_exit_with, initargs=(os.getpid(),)
            )

    def map(self, chunks: Iterable[list[str]]) -> Iterator[Decoded]:
        if self._executor is None:
            for chunk in chunks:
                yield decode_chunk(chunk, self.spec, self.keep_originals)
            return
        pending: collections.deque[Future[Decoded]] = collections.deque()
        try:
            for chunk in chunks:
                pending.append(self._executor.submit(decode_chunk, chunk, self.spec, self.keep_originals))
                if len(pending) >= self.window:
                    yield _result(pending.popleft())
            while pending:
                yield _result(pending.popleft())
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
