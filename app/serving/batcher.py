"""Adaptive micro-batching: a bounded queue of (item, future) records and one worker task.

No torch here. The worker is greedy: when it is idle, a request runs at once (no fixed wait at
low load); while a batch runs on the inference thread, arrivals queue up and form the next batch,
up to ``max_batch_size``. ``max_wait_ms`` may hold a batch open after its first item.

An optional ``finish`` stage (the service's embedding-store write) runs each batch's outputs on a
second thread of its own, and the batch's futures resolve only once it is done; meanwhile the
inference thread already runs the next batch. Finishes run one at a time, in batch order.

Invariants:
* the queue is bounded in items; a submission that does not fit is refused at once (QueueFull);
* every future resolves exactly once -- with a result, the batch's error, DeadlineExceeded, or
  cancellation by its caller; records whose future is already done are skipped, never run;
* a batch's output count is checked against its input count;
* ``stop()`` refuses new work, then answers everything already accepted before the worker ends.
"""

from __future__ import annotations

import asyncio
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
    enqueued: float
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
        self._finishing: asyncio.Task[None] | None = None
        self._queue: deque[_Record[In, Out]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        # One inference thread: the network never runs on the event loop, and never twice at once.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._finish_executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
                                 if finish is not None else None)
        self._closing = False
        self.stats = BatchStats()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("batcher already started")
        self._wakeup = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    async def stop(self) -> None:
        """Refuse new work, answer everything accepted, then end the worker and its thread."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)
        if self._finish_executor is not None:
            self._finish_executor.shutdown(wait=True)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def on_inference_thread(self, fn: Callable[..., object], *args: object) -> None:
        """Run fn on the inference thread itself (the warm-up, before ``start``), so that its
        thread-local state (allocator caches, engine scratch space) is warm too."""
        await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- submission --------------------------------------------------------------------------
    def submit_many(self, items: Sequence[In], timeout_s: float) -> list[asyncio.Future[Out]]:
        """Queue all items or none; the futures resolve as described in the module docstring."""
        if self._closing or self._wakeup is None:
            raise Closed("the service is shutting down")
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFull(f"queue full ({len(self._queue)}/{self.max_queue} images waiting)")
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + timeout_s
        futures: list[asyncio.Future[Out]] = []
        for item in items:
            fut: asyncio.Future[Out] = loop.create_future()
            record = _Record(item, fut, deadline, now)
            record.timer = loop.call_at(deadline, self._expire, fut)
            self._queue.append(record)
            futures.append(fut)
        self._wakeup.set()
        return futures

    async def submit(self, item: In, timeout_s: float) -> Out:
        return await self.submit_many([item], timeout_s)[0]

    def _expire(self, fut: asyncio.Future[Out]) -> None:
        # The deadline passed while the record waited: answer now. If it is already in a running
        # batch its result will simply be dropped (the future is done).
        if not fut.done():
            fut.set_exception(DeadlineExceeded("request deadline passed while queued"))

    # -- the worker ----------------------------------------------------------------------------
    def _take_batch(self) -> list[_Record[In, Out]]:
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

    async def _work(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    if self._finishing is not None:
                        await self._finishing
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_wait_s > 0 and len(self._queue) < self.max_batch_size and not self._closing:
                # hold the batch open until max_wait after its first item, or until it is full
                first = self._queue[0].enqueued
                while (len(self._queue) < self.max_batch_size and not self._closing
                       and (left := first + self.max_wait_s - loop.time()) > 0):
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), left)
                    except TimeoutError:
                        break
            batch = self._take_batch()
            if not batch:
                continue
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Record[In, Out]]) -> None:
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(
                self._executor, self._run_batch, [r.item for r in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"batch returned {len(outputs)} outputs for {len(batch)} inputs")
        except Exception as exc:  # a failing batch fails each of its callers, and only them
            self._fail(batch, exc)
            return
        finally:
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
            if self._on_batch is not None:
                self._on_batch(len(batch), time.perf_counter() - started)
        if self._finish is None:
            self._resolve(batch, outputs)
            return
        # one finish at a time, in order: wait for the previous batch's (it has had this whole
        # forward pass to complete), then let this one run while the next batch computes
        if self._finishing is not None:
            await self._finishing
        self._finishing = loop.create_task(self._finish_batch(loop, batch, outputs))

    async def _finish_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Record[In, Out]],
                            outputs: Sequence[Out]) -> None:
        assert self._finish is not None
        try:
            await loop.run_in_executor(self._finish_executor, self._finish,
                                       [r.item for r in batch], outputs)
        except Exception as exc:  # e.g. the store refused the write: these callers fail
            self._fail(batch, exc)
            return
        self._resolve(batch, outputs)

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
