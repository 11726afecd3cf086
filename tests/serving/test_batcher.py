"""The micro-batcher on its own: greedy batching, bounds, deadlines, cancellation, draining."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
from helpers.waits import until

from app.serving.batcher import Closed, DeadlineExceeded, MicroBatcher, QueueFull


class Recorder:
    """A run_batch that records every batch it sees and can be held, made slow or failing.

    ``entered`` is set when a batch reaches it: with the gate closed, the inference thread is
    then held inside that batch."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.threads: set[str] = set()
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.entered.set()
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        return [i * 10 for i in items]


async def test_idle_worker_runs_a_single_request_at_once() -> None:
    """Alone, with room for 8: run, not held for more (held, it would miss its deadline). How
    long it takes is a figure: bench/serve.py's latency at concurrency 1."""
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=8, max_wait_ms=0)
    b.start()
    assert await b.submit(3, 5.0) == 30
    await b.stop()
    assert rec.batches == [[3]]
    assert all(t.startswith("inference") for t in rec.threads)


async def test_arrivals_during_a_batch_form_the_next_batch() -> None:
    rec = Recorder()
    rec.gate.clear()
    b = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0)
    b.start()
    first = asyncio.ensure_future(b.submit(0, 5.0))
    await until(rec.entered.is_set, "the first batch to be running")
    rest = [asyncio.ensure_future(b.submit(i, 5.0)) for i in range(1, 10)]
    await until(lambda: b.depth == 9, "nine arrivals to queue during the first batch")
    rec.gate.set()
    results = await asyncio.gather(first, *rest)
    await b.stop()
    assert results == [i * 10 for i in range(10)]
    assert rec.batches[0] == [0]
    assert rec.batches[1:] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]  # capped at max_batch_size
    assert b.stats.sizes == {1: 2, 4: 2}


async def test_max_wait_holds_a_batch_open_until_it_is_full() -> None:
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=3, max_wait_ms=600_000)
    b.start()
    futs = [asyncio.ensure_future(b.submit(0, 5.0))]
    # the worker has taken the wake-up for item 0 and holds the batch open (a greedy worker
    # would now run [0] alone)
    await until(lambda: b.holding_open,
                "the worker to hold the batch open")
    assert rec.batches == []
    futs += [asyncio.ensure_future(b.submit(i, 5.0)) for i in (1, 2)]
    # full at 3: it runs then, long before max_wait (or the 5 s deadlines) would pass
    assert await asyncio.gather(*futs) == [0, 10, 20]
    await b.stop()
    assert rec.batches == [[0, 1, 2]]


async def test_max_wait_closes_a_batch_that_does_not_fill() -> None:
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=16, max_wait_ms=20)
    b.start()
    assert await b.submit(0, 5.0) == 0  # run once max_wait has passed, not held for 16
    await b.stop()
    assert rec.batches == [[0]]


async def test_queue_full_is_refused_at_once_and_all_or_nothing() -> None:
    rec = Recorder()
    rec.gate.clear()  # hold the inference thread
    b = MicroBatcher(rec, max_batch_size=2, max_wait_ms=0, max_queue=3)
    b.start()
    running = asyncio.ensure_future(b.submit(0, 5.0))
    await until(rec.entered.is_set, "item 0 to be in the (blocked) batch")
    assert b.depth == 0
    queued = b.submit_many([1, 2], 5.0)
    with pytest.raises(QueueFull):
        b.submit_many([3, 4], 5.0)  # 2 + 2 > 3: none of them is queued
    assert b.depth == 2
    rec.gate.set()
    assert await asyncio.gather(running, *queued) == [0, 10, 20]
    await b.stop()


async def busy_batcher() -> tuple[Recorder, MicroBatcher[int, int], asyncio.Future[int]]:
    """A started batcher whose inference thread is blocked inside a batch of [0]."""
    rec = Recorder()
    rec.gate.clear()
    b: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0)
    b.start()
    running = asyncio.ensure_future(b.submit(0, 5.0))
    await until(rec.entered.is_set, "item 0 to be in the (blocked) batch")
    return rec, b, running


async def test_expired_items_are_answered_and_never_run() -> None:
    rec, b, running = await busy_batcher()
    doomed = asyncio.ensure_future(b.submit(1, 0.05))
    with pytest.raises(DeadlineExceeded):
        await doomed  # answered at its deadline, while the network is still busy
    rec.gate.set()
    assert await running == 0
    await b.stop()
    assert [1] not in rec.batches and all(1 not in batch for batch in rec.batches)
    assert b.stats.expired == 1


async def test_cancelled_callers_are_skipped() -> None:
    rec, b, running = await busy_batcher()
    gone = asyncio.ensure_future(b.submit(1, 5.0))
    kept = asyncio.ensure_future(b.submit(2, 5.0))
    await until(lambda: b.depth == 2, "both to queue")
    gone.cancel()
    rec.gate.set()
    assert await kept == 20 and await running == 0
    await b.stop()
    assert rec.batches == [[0], [2]]
    assert b.stats.cancelled == 1


async def test_output_count_is_checked() -> None:
    b: MicroBatcher[int, int] = MicroBatcher(lambda items: [1], max_batch_size=4)
    b.start()
    futs = b.submit_many([1, 2], 5.0)
    for f in futs:
        with pytest.raises(RuntimeError, match="1 outputs for 2 inputs"):
            await f
    await b.stop()


async def test_stop_answers_everything_accepted_then_refuses() -> None:
    rec = Recorder(delay_s=0.01)
    b = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0, max_queue=100)
    b.start()
    futs = b.submit_many(list(range(40)), 10.0)
    await asyncio.sleep(0)
    await b.stop()  # drains the 40 accepted items first
    assert all(f.done() and not f.cancelled() for f in futs)
    assert [f.result() for f in futs] == [i * 10 for i in range(40)]
    with pytest.raises(Closed):
        b.submit_many([1], 1.0)


async def test_every_future_resolves_exactly_once_under_churn() -> None:
    rec = Recorder(delay_s=0.002)
    b = MicroBatcher(rec, max_batch_size=8, max_wait_ms=1, max_queue=10_000)
    b.start()
    futs = []
    for i in range(300):
        futs += b.submit_many([i], 0.02 if i % 7 == 0 else 5.0)
        if i % 11 == 0:
            futs[-1].cancel()
        if i % 25 == 0:
            await asyncio.sleep(0.005)
    await b.stop()
    assert all(f.done() for f in futs)
    ran = [i for batch in rec.batches for i in batch]
    assert len(ran) == len(set(ran))  # nothing ran twice
    ok = [f for f in futs if not f.cancelled() and f.exception() is None]
    assert b.stats.items == len(ran) and len(ok) <= len(ran)


class Keeper:
    """A finish stage (the service's store write) that records, can be held and can fail;
    ``entered`` is set when a batch reaches it."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.kept: list[tuple[list[int], list[int]]] = []
        self.threads: set[str] = set()
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on

    def __call__(self, items: list[int], outputs: Sequence[int]) -> None:
        self.entered.set()
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and self.fail_on in items:
            raise OSError("store refused the write")
        self.kept.append((list(items), list(outputs)))


async def test_finish_runs_before_answers_while_the_next_batch_computes() -> None:
    rec, keep = Recorder(), Keeper()
    keep.gate.clear()  # hold the finish stage
    b = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0, finish=keep)
    b.start()
    first = asyncio.ensure_future(b.submit(1, 5.0))
    await until(keep.entered.is_set, "the first batch to reach the finish stage")
    assert rec.batches == [[1]] and not first.done()  # computed, not yet kept: not answered
    second = asyncio.ensure_future(b.submit(2, 5.0))
    # the next forward pass does not wait for the finish (if it did, this would time out)
    await until(lambda: rec.batches == [[1], [2]], "the second forward pass")
    assert not first.done() and not second.done()
    keep.gate.set()
    assert await asyncio.gather(first, second) == [10, 20]
    await b.stop()
    assert keep.kept == [([1], [10]), ([2], [20])]  # every batch kept, in order
    assert all(t.startswith("finish") for t in keep.threads)


@pytest.mark.parametrize("stage", ["forward", "finish"])
async def test_a_failing_batch_fails_each_of_its_callers_and_only_them(stage: str) -> None:
    """The forward pass raising, or the finish stage (the store write) refusing the batch."""
    if stage == "forward":
        rec, keep, error = Recorder(fail_on=2), None, RuntimeError
    else:
        rec, keep, error = Recorder(), Keeper(fail_on=2), OSError
    rec.gate.clear()
    b = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0, finish=keep)
    b.start()
    first = asyncio.ensure_future(b.submit(0, 5.0))
    await until(rec.entered.is_set, "the first batch to be running")
    bad_batch = [asyncio.ensure_future(b.submit(i, 5.0)) for i in (1, 2)]
    await until(lambda: b.depth == 2, "1 and 2 to queue: the next batch")
    rec.gate.set()
    outcomes = await asyncio.gather(*bad_batch, return_exceptions=True)
    assert all(isinstance(o, error) for o in outcomes)
    assert await first == 0
    assert await b.submit(5, 5.0) == 50  # the worker is still alive
    await b.stop()
    assert rec.batches == [[0], [1, 2], [5]]
    assert b.stats.failed_batches == 1


async def test_stop_waits_for_the_last_finish() -> None:
    keep = Keeper()
    b = MicroBatcher(Recorder(delay_s=0.005), max_batch_size=4, max_wait_ms=0, finish=keep)
    b.start()
    futs = b.submit_many(list(range(10)), 10.0)
    await asyncio.sleep(0)
    await b.stop()
    assert [f.result() for f in futs] == [i * 10 for i in range(10)]
    assert sorted(i for items, _ in keep.kept for i in items) == list(range(10))
