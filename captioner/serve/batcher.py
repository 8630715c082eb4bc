"""Batching across requests: items submitted within ``max_wait`` seconds of each other run as
one batch on a model thread (``workers`` of them, default one; each takes the next batch when
it is free).

The queue is bounded in items (images): :meth:`Batcher.submit` raises :class:`QueueFull` at
once rather than letting a backlog grow, and the service answers 503 with ``Retry-After``.
While a batch runs on the model thread, new items wait in the queue, so under load the next
batch is as large as ``max_batch`` without any extra wait.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

POLL_S = 0.001  # how often the queue is looked at while a batch is being gathered


class QueueFull(Exception):
    """The queue cannot take the items now; ``retry_after`` is a hint in whole seconds."""

    def __init__(self, pending: int, capacity: int, retry_after: int):
        super().__init__(f"busy: {pending} image(s) queued (capacity {capacity}); retry in "
                         f"{retry_after} s")
        self.retry_after = retry_after


@dataclass
class Stats:
    """Counters for /healthz and the tests."""

    batches: int = 0
    items: int = 0
    rejected: int = 0
    largest_batch: int = 0
    sizes: list[int] = field(default_factory=list)  # the last few batch sizes
    last_batch_s: float = 0.0

    def record(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.items += size
        self.largest_batch = max(self.largest_batch, size)
        self.sizes = [*self.sizes[-31:], size]
        self.last_batch_s = seconds


class Batcher:
    """Gathers items from concurrent :meth:`submit` calls into lists for ``run_batch``.

    ``run_batch(items) -> results`` (same length and order) runs on ``workers`` threads: with
    one (the default) the model is never called from two threads at once; more run that many
    batches at once, for models whose calls are thread-safe.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch: int = 16,
                 max_wait: float = 0.005, max_queue: int = 64, workers: int = 1):
        if max_batch < 1 or max_queue < 1 or max_wait < 0 or workers < 1:
            raise ValueError("max_batch, max_queue and workers must be >= 1 and max_wait >= 0")
        self.run_batch = run_batch
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self.workers = workers
        self.stats = Stats()
        self.on_batch: Callable[[int, float], None] | None = None  # (size, seconds) per batch
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._executor: ThreadPoolExecutor | None = None

    @property
    def pending(self) -> int:
        """Items waiting for the model (not counting the batch it is running)."""
        return self._queue.qsize() if self._queue else 0

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="captioner-model")
        self._tasks = [asyncio.create_task(self._worker(), name=f"captioner-batcher-{k}")
                       for k in range(self.workers)]

    async def stop(self) -> None:
        """Stop the worker; items still queued or running fail with ``RuntimeError`` (a batch
        already on the model thread finishes there, unawaited)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the service is shutting down"))
        if self._executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._tasks, self._executor = [], None

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        """Results of ``items`` once their batch(es) ran; :class:`QueueFull` when they do not
        fit in the queue now (nothing of them is queued then)."""
        return (await self.submit_sized(items))[0]

    async def submit_sized(self, items: Sequence[Any]) -> tuple[list[Any], int]:
        """:meth:`submit`, plus the size of the largest batch the items ran in."""
        if not self._tasks or all(task.done() for task in self._tasks):
            raise RuntimeError("the batcher is not running")
        if self.pending + len(items) > self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(self.pending, self.max_queue, self._retry_after())
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures, strict=True):
            self._queue.put_nowait((item, future))
        done = await asyncio.gather(*futures)  # (result, batch size) each
        return [result for result, _ in done], max(size for _, size in done)

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        batches = math.ceil((self.pending + 1) / self.max_batch)
        return max(1, math.ceil(batches * self.stats.last_batch_s / self.workers))

    async def _collect(self) -> list[tuple[Any, asyncio.Future]]:
        """The next batch: the first item, then whatever arrives within ``max_wait``."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while 1 + self._queue.qsize() < self.max_batch and loop.time() < deadline:
            await asyncio.sleep(min(POLL_S, deadline - loop.time()))  # no get() to cancel
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(item, f) for item, f in await self._collect() if not f.done()]  # drop cancelled
            if not batch:
                continue
            items = [item for item, _ in batch]
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
            except asyncio.CancelledError:  # stop() while this batch runs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(RuntimeError("the service is shutting down"))
                raise
            except Exception as exc:  # the requests of this batch fail, the service goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            seconds = time.perf_counter() - start
            self.stats.record(len(items), seconds)
            if self.on_batch is not None:
                self.on_batch(len(items), seconds)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result((result, len(items)))
