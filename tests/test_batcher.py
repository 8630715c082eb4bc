"""The request batcher of ``captioner serve`` on its own: batch sizes, waits, a full queue,
cancelled requests, shutdown (no model, no web framework)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from captioner.serve.batcher import Batcher, QueueFull


def _recorder(gate: threading.Event | None = None):
    """run_batch that records each batch and answers item * 10 (after ``gate``, if any)."""
    batches: list[list[int]] = []

    def run(items):
        batches.append(list(items))
        if gate is not None:
            assert gate.wait(10)
        return [i * 10 for i in items]

    return run, batches


async def _until(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


def test_simultaneous_items_share_batches_of_at_most_max_batch():
    async def main():
        run, batches = _recorder()
        batcher = Batcher(run, max_batch=4, max_wait=0.05, max_queue=64)
        await batcher.start()
        results = await asyncio.gather(batcher.submit([1, 2, 3]), batcher.submit([4, 5]),
                                       batcher.submit([6, 7, 8, 9, 10]))
        await batcher.stop()
        return results, batches, batcher.stats

    results, batches, stats = asyncio.run(main())
    assert results == [[10, 20, 30], [40, 50], [60, 70, 80, 90, 100]]
    assert batches == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert (stats.batches, stats.items, stats.largest_batch) == (3, 10, 4)


def test_items_further_apart_than_max_wait_run_separately():
    async def main():
        run, batches = _recorder()
        batcher = Batcher(run, max_batch=8, max_wait=0.001)
        await batcher.start()
        first = await batcher.submit([1])
        await asyncio.sleep(0.05)
        second = await batcher.submit([2])
        await batcher.stop()
        return first, second, batches

    assert asyncio.run(main()) == ([10], [20], [[1], [2]])


def test_full_queue_refuses_the_whole_submission_at_once():
    async def main():
        gate = threading.Event()
        run, batches = _recorder(gate)
        batcher = Batcher(run, max_batch=1, max_wait=0, max_queue=3)
        await batcher.start()
        busy = asyncio.create_task(batcher.submit([1]))
        await _until(lambda: batches == [[1]])  # the model thread is busy with item 1
        waiting = asyncio.create_task(batcher.submit([2, 3]))
        await _until(lambda: batcher.pending == 2)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit([4, 5])  # 2 + 2 > 3
        assert batcher.pending == 2 and refused.value.retry_after >= 1
        gate.set()
        results = await asyncio.gather(busy, waiting)
        await batcher.stop()
        return results, batches, batcher.stats.rejected

    results, batches, rejected = asyncio.run(main())
    assert results == [[10], [20, 30]] and batches == [[1], [2], [3]] and rejected == 1


def test_cancelled_requests_are_not_run_and_errors_fail_only_their_batch():
    async def main():
        gate = threading.Event()
        calls: list[list[int]] = []

        def run(items):
            calls.append(list(items))
            assert gate.wait(10)
            if 13 in items:
                raise ValueError("bad batch")
            return [i * 10 for i in items]

        batcher = Batcher(run, max_batch=8, max_wait=0)
        await batcher.start()
        first = asyncio.create_task(batcher.submit([1]))
        await _until(lambda: calls == [[1]])
        gone = asyncio.create_task(batcher.submit([2]))
        await _until(lambda: batcher.pending == 1)
        gone.cancel()  # the client went away while its image was queued
        gate.set()
        assert await first == [10]
        with pytest.raises(ValueError, match="bad batch"):
            await batcher.submit([13])
        after = await batcher.submit([3])
        await batcher.stop()
        return calls, after

    calls, after = asyncio.run(main())
    assert calls == [[1], [13], [3]] and after == [30]


def test_stop_fails_what_is_still_queued():
    async def main():
        gate = threading.Event()
        run, batches = _recorder(gate)
        batcher = Batcher(run, max_batch=1, max_wait=0)
        await batcher.start()
        running = asyncio.create_task(batcher.submit([1]))
        await _until(lambda: batches == [[1]])
        queued = asyncio.create_task(batcher.submit([2]))
        await _until(lambda: batcher.pending == 1)
        threading.Timer(0.1, gate.set).start()  # the running batch finishes during stop()
        await batcher.stop()
        for request in (running, queued):
            with pytest.raises(RuntimeError, match="shutting down"):
                await request
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit([3])

    asyncio.run(main())


def test_two_workers_run_two_batches_at_once_and_one_never_does():
    """workers=2: a second batch starts while the first is still running (ONNX Runtime's
    sessions take concurrent runs); workers=1: the second waits for the first."""

    async def main(workers: int):
        gate = threading.Event()
        run, batches = _recorder(gate)
        batcher = Batcher(run, max_batch=1, max_wait=0, workers=workers)
        await batcher.start()
        first = asyncio.create_task(batcher.submit([1]))
        second = asyncio.create_task(batcher.submit([2]))
        await _until(lambda: len(batches) >= 1)
        await asyncio.sleep(0.1)
        started = sorted(map(tuple, batches))  # batches running before either may finish
        gate.set()
        results = await asyncio.gather(first, second)
        await batcher.stop()
        return started, results

    assert asyncio.run(main(2)) == ([(1,), (2,)], [[10], [20]])
    assert asyncio.run(main(1)) == ([(1,)], [[10], [20]])
    with pytest.raises(ValueError, match="workers"):
        Batcher(lambda items: items, workers=0)
