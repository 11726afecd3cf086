"""Adaptive micro-batching: a bounded queue of (item, future) records and one inference thread.

No torch here. The inference thread forms its batches itself: when it is idle, a request runs
at once (no fixed wait at low load); while a batch runs, arrivals queue up and form the next
batch, up to ``max_batch_size``, which the thread takes the moment the last one is done, without
waiting for the event loop (under load the loop is busy with HTTP, and a hand-back through it
left the network idle a third of the time, measured with bench/profile_serve.py).
``max_wait_ms`` may hold a batch open after its first item.

The loop's side is cheap and never blocks on the network: a submission appends to the queue
under a lock held only for the append (the thread holds it only to take a batch) and wakes the
thread if it sleeps; results come back as one ``call_soon_threadsafe`` per batch.

An optional ``finish`` stage (the service's embedding-store write) runs each batch's outputs on a
second thread of its own, and the batch's futures resolve only once it is done; meanwhile the
inference thread already runs the next batch. Finishes run one at a time, in batch order.

Invariants:
* the queue is bounded in items; a submission that does not fit is refused at once (QueueFull);
* every future resolves exactly once -- with a result, the batch's error, DeadlineExceeded, or
  cancellation by its caller; records whose future is already done are skipped, never run
  (futures are resolved on the loop only; the thread only reads whether one is done);
* a batch's output count is checked against its input count;
* ``stop()`` refuses new work, then answers everything already accepted before the thread ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class BatcherError(Exception):
    """Base of the batcher's refusals."""


class QueueFull(BatcherError):
    """Not enough room in the queue: answer 503 with Retry-After."""


class Closed(BatcherError):
    """The batcher is draining or stopped: answer 503."""


class DeadlineExceeded(BatcherError):
    """The item's deadline passed before it reached the network: answer 504."""


@dataclass(slots=True)
class _Record(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    deadline: float  # loop.time()
    enqueued: float  # time.monotonic(): the inference thread's clock for max_wait
    timer: asyncio.TimerHandle | None = None


@dataclass
class BatchStats:
    """Counters the service exports as metrics (and tests use to prove batching)."""

    batches: int = 0
    items: int = 0
    expired: int = 0
    cancelled: int = 0
    failed_batches: int = 0
    sizes: dict[int, int] = field(default_factory=dict)


class MicroBatcher(Generic[In, Out]):
    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
        finish: Callable[[list[In], Sequence[Out]], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be positive")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._finish = finish
        self._queue: deque[_Record[In, Out]] = deque()
        self._calls: deque[tuple[Callable[[], object], concurrent.futures.Future[object]]] = \
            deque()
        # guards the queue, the calls and the closing flag; the loop holds it for an append
        self._cond = threading.Condition(threading.Lock())
        self._loop: asyncio.AbstractEventLoop | None = None
        # One inference thread: the network never runs on the event loop, and never twice at once.
        self._thread: threading.Thread | None = None
        self._finish_executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
                                 if finish is not None else None)
        self._closing = False
        self.holding_open = False  # the thread holds a batch open for max_wait (tests see it)
        self.stats = BatchStats()

    # -- lifecycle ---------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
            self._thread.start()

    def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("batcher already started")
        self._loop = asyncio.get_running_loop()
        self._ensure_thread()

    async def stop(self) -> None:
        """Refuse new work, answer everything accepted, then end the thread and the finish
        stage. Their last answers were handed to the loop before these joins return, so they
        have run by the time this does (the loop runs callbacks in order)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._finish_executor is not None:
            await asyncio.to_thread(self._finish_executor.shutdown, True)
        await asyncio.sleep(0)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def on_inference_thread(self, fn: Callable[..., object], *args: object) -> None:
        """Run fn on the inference thread itself (the warm-up, before ``start``), so that its
        thread-local state (allocator caches, engine scratch space) is warm too."""
        done: concurrent.futures.Future[object] = concurrent.futures.Future()
        with self._cond:
            self._calls.append((lambda: fn(*args), done))
            self._cond.notify()
        self._ensure_thread()
        await asyncio.wrap_future(done)

    # -- submission (the event loop) ---------------------------------------------------------
    def submit_many(self, items: Sequence[In], timeout_s: float) -> list[asyncio.Future[Out]]:
        """Queue all items or none; the futures resolve as described in the module docstring."""
        if self._closing or self._loop is None:
            raise Closed("the service is shutting down")
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFull(f"queue full ({len(self._queue)}/{self.max_queue} images waiting)")
        loop = self._loop
        now, enqueued = loop.time(), time.monotonic()
        deadline = now + timeout_s
        records: list[_Record[In, Out]] = []
        for item in items:
            fut: asyncio.Future[Out] = loop.create_future()
            record = _Record(item, fut, deadline, enqueued)
            record.timer = loop.call_at(deadline, self._expire, fut)
            records.append(record)
        with self._cond:
            if self._closing:  # stop() began between the check above and here
                for r in records:
                    self._settle(r)
                raise Closed("the service is shutting down")
            self._queue.extend(records)
            self._cond.notify()
        return [r.future for r in records]

    async def submit(self, item: In, timeout_s: float) -> Out:
        return await self.submit_many([item], timeout_s)[0]

    def _expire(self, fut: asyncio.Future[Out]) -> None:
        # The deadline passed while the record waited: answer now. If it is already in a running
        # batch its result will simply be dropped (the future is done).
        if not fut.done():
            fut.set_exception(DeadlineExceeded("request deadline passed while queued"))

    # -- the inference thread ----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._calls and not self._closing:
                    self._cond.wait()
                call = self._calls.popleft() if self._calls else None
                if call is None:
                    if not self._queue:  # closing, and everything accepted has run
                        return
                    self._hold_open()
                    batch = self._take_batch()
            if call is not None:
                self._call(*call)
            elif batch:
                self._run(batch)

    @staticmethod
    def _call(fn: Callable[[], object], done: concurrent.futures.Future[object]) -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:  # handed to the awaiting caller
            done.set_exception(exc)

    def _hold_open(self) -> None:
        """With the lock held: with max_wait, wait until max_wait after the first item, or
        until the batch is full, or the batcher closes."""
        if self.max_wait_s <= 0:
            return
        first = self._queue[0].enqueued
        self.holding_open = True
        while (len(self._queue) < self.max_batch_size and not self._closing
               and (left := first + self.max_wait_s - time.monotonic()) > 0):
            self._cond.wait(left)
        self.holding_open = False

    def _take_batch(self) -> list[_Record[In, Out]]:
        """With the lock held: up to max_batch_size records whose future is not done."""
        batch: list[_Record[In, Out]] = []
        while self._queue and len(batch) < self.max_batch_size:
            record = self._queue.popleft()
            if record.future.done():  # cancelled by its caller, or expired: never run it
                if record.future.cancelled():
                    self.stats.cancelled += 1
                else:
                    self.stats.expired += 1
                continue
            batch.append(record)
        return batch

    def _run(self, batch: list[_Record[In, Out]]) -> None:
        assert self._loop is not None
        started = time.perf_counter()
        try:
            outputs = self._run_batch([r.item for r in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"batch returned {len(outputs)} outputs for {len(batch)} inputs")
        except Exception as exc:  # a failing batch fails each of its callers, and only them
            self._loop.call_soon_threadsafe(self._fail, batch, exc)
            return
        finally:
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
            if self._on_batch is not None:
                self._on_batch(len(batch), time.perf_counter() - started)
        if self._finish_executor is None:
            self._loop.call_soon_threadsafe(self._resolve, batch, outputs)
        else:  # one worker: finishes run one at a time, in batch order
            self._finish_executor.submit(self._finish_batch, batch, outputs)

    def _finish_batch(self, batch: list[_Record[In, Out]], outputs: Sequence[Out]) -> None:
        """On the finish thread, while the next batch computes."""
        assert self._finish is not None and self._loop is not None
        try:
            self._finish([r.item for r in batch], outputs)
        except Exception as exc:  # e.g. the store refused the write: these callers fail
            self._loop.call_soon_threadsafe(self._fail, batch, exc)
            return
        self._loop.call_soon_threadsafe(self._resolve, batch, outputs)

    # -- answers (the event loop) ------------------------------------------------------------
    def _fail(self, batch: list[_Record[In, Out]], exc: Exception) -> None:
        self.stats.failed_batches += 1
        for r in batch:
            self._settle(r)
            if not r.future.done():
                r.future.set_exception(exc)

    def _resolve(self, batch: list[_Record[In, Out]], outputs: Sequence[Out]) -> None:
        for r, out in zip(batch, outputs, strict=True):
            self._settle(r)
            if not r.future.done():
                r.future.set_result(out)

    @staticmethod
    def _settle(record: _Record[In, Out]) -> None:
        if record.timer is not None:
            record.timer.cancel()
