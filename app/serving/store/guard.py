"""The embedding store behind a circuit breaker: a store outage never fails a prediction.

Three states. UP: calls go to the store. The first call that fails with the store's own
failure (StoreFailure: Redis gone, SQLite locked, full or read-only) opens the breaker, DOWN:
writes are skipped at once (the vectors are simply not stored, and the caller is told), reads
raise StoreUnavailable (the API answers 503 with Retry-After), so no request waits for a dead
store's timeout. Meanwhile one
background thread probes the store (``ping()``, or opening it if it never opened) with
exponential backoff and jitter. A successful probe moves to TRIAL: calls go through again; the
first one that succeeds closes the breaker (UP), one that fails opens it again with a longer
backoff, as part of the same outage. An outage is logged twice: when it begins and when it ends.

Any other exception from a store is a bug in our code, not an outage: it is logged with its
traceback and fails only the call that hit it (a write returns False, a read raises it on, so
that one request answers 500); the breaker does not move, and every other call goes through.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TypeVar

import numpy as np

from app.serving.metrics import Metrics
from app.serving.store.base import EmbeddingStore, StoreFailure
from app.serving.store.vector_index import Neighbor, SearchUnavailable

log = logging.getLogger("imgrec.store")
T = TypeVar("T")


class StoreUnavailable(Exception):
    """The store is down (the breaker is open, or this very call failed)."""


class State(Enum):
    UP = "up"
    DOWN = "down"
    TRIAL = "trial"


def _describe(exc: BaseException) -> str:
    # the driver exception's class and message: driver messages name the host and port, never
    # a password (the store URL itself is never logged)
    cause = exc.__cause__ if isinstance(exc, StoreFailure) and exc.__cause__ else exc
    return f"{type(cause).__name__}: {cause}"[:300]


class GuardedStore:
    def __init__(self, opener: Callable[[], EmbeddingStore], metrics: Metrics, *,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 10.0) -> None:
        self._opener = opener
        self._metrics = metrics
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = max(backoff_max_s, backoff_min_s)
        self.store: EmbeddingStore | None = None  # None until it has opened
        self.state = State.UP
        self._lock = threading.Lock()
        self._backoff_s = backoff_min_s
        self._outage_began = 0.0
        self._unstored_in_outage = 0
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Open the store; when it fails (StoreFailure), serve without it and keep trying in the
        background. Anything else, a malformed setting (ValueError) for one, is still an error
        at start-up."""
        try:
            self.store = self._opener()
        except StoreFailure as e:
            self._failed("open", e)
            return
        self._metrics.store_up.set(1)

    def close(self) -> None:
        self._stop.set()
        prober = self._prober
        if prober is not None:
            prober.join(timeout=10)
        if self.store is not None:
            self.store.close()

    @property
    def up(self) -> bool:
        return self.state is State.UP

    # -- calls -------------------------------------------------------------------------------
    def put_many(self, key: str, items: Sequence[tuple[str, np.ndarray]],
                 filenames: Sequence[str | None] | None = None) -> bool:
        """Store the vectors; False (and nothing raised) when they could not be stored."""
        if not items:
            return True
        try:
            self._call("put", lambda store: store.put_many(key, items, filenames))
        except Exception:  # StoreUnavailable, or a bug that _call has logged
            self._unstored(len(items))
            return False
        return True

    def get_many(self, key: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return self._call("get", lambda store: store.get_many(key, ids))

    def search(self, key: str, query: np.ndarray, k: int,
               exclude: str | None = None) -> list[Neighbor]:
        """The store's similarity search; a store that cannot search (SearchUnavailable) is
        not an outage."""
        return self._call("search", lambda store: store.search(key, query, k, exclude))

    def filenames(self, key: str, ids: Sequence[str]) -> dict[str, str | None]:
        return self._call("get", lambda store: store.filenames(key, ids))

    def count(self) -> int:
        return self._call("count", lambda store: store.count())

    def _call(self, op: str, call: Callable[[EmbeddingStore], T]) -> T:
        """One guarded call: StoreUnavailable while the breaker is open or when the store
        fails now (which opens it); a bug's exception is logged and raised on, and leaves the
        breaker as it was."""
        store = self.store
        if self.state is State.DOWN or store is None:
            raise StoreUnavailable("the embedding store is unavailable")
        try:
            result = call(store)
        except StoreFailure as e:
            self._failed(op, e)
            raise StoreUnavailable("the embedding store is unavailable") from e
        except SearchUnavailable:
            raise
        except Exception:
            self._metrics.store_errors.labels(op).inc()
            log.exception("embedding store %s failed: a bug, not an outage (the store stays "
                          "in use; only this call fails)", op)
            raise
        self._succeeded()
        return result

    # -- the breaker ---------------------------------------------------------------------------
    def _unstored(self, n: int) -> None:
        self._metrics.store_unstored.inc(n)
        with self._lock:
            self._unstored_in_outage += n

    def _failed(self, op: str, exc: BaseException) -> None:
        self._metrics.store_errors.labels(op).inc()
        with self._lock:
            if self.state is State.DOWN:  # a call that raced the first failure: same outage
                return
            if self.state is State.UP:
                self._outage_began = time.monotonic()
                self._unstored_in_outage = 0
                self._backoff_s = self.backoff_min_s
                self._metrics.store_outages.inc()
                log.warning("embedding store unavailable (%s failed: %s): predictions go on "
                            "without storing vectors, lookups answer 503; probing it with "
                            "backoff", op, _describe(exc))
            else:  # the trial after a good probe failed: a longer wait, no new outage
                self._backoff_s = min(self._backoff_s * 2, self.backoff_max_s)
                log.debug("embedding store still failing (%s: %s)", op, _describe(exc))
            self.state = State.DOWN
            self._metrics.store_up.set(0)
            if self._prober is None and not self._stop.is_set():
                self._prober = threading.Thread(target=self._probe_loop, name="store-probe",
                                                daemon=True)
                self._prober.start()

    def _succeeded(self) -> None:
        if self.state is not State.TRIAL:  # UP: nothing to do; DOWN: a call from before
            return
        with self._lock:
            if self.state is not State.TRIAL:
                return
            self.state = State.UP
            self._metrics.store_up.set(1)
            log.warning("embedding store available again after %.1f s (%d vectors were not "
                        "stored meanwhile)", time.monotonic() - self._outage_began,
                        self._unstored_in_outage)

    def _probe_loop(self) -> None:
        while True:
            with self._lock:
                delay = self._backoff_s * random.uniform(0.8, 1.2)  # replicas spread out
            if self._stop.wait(delay):
                with self._lock:
                    self._prober = None
                return
            try:
                if self.store is None:
                    self.store = self._opener()
                self.store.ping()
            except Exception as e:
                self._metrics.store_errors.labels("probe").inc()
                if isinstance(e, StoreFailure):
                    log.debug("embedding store probe failed: %s", _describe(e))
                else:  # a bug in opening or pinging: said loudly, and probed again later
                    log.exception("embedding store probe failed: a bug, not an outage")
                with self._lock:
                    self._backoff_s = min(self._backoff_s * 2, self.backoff_max_s)
                continue
            with self._lock:
                self.state = State.TRIAL
                self._prober = None
            return
