"""The embedding store behind a circuit breaker: a store outage never fails a prediction.

Three states. UP: calls go to the store. The first call that fails (Redis gone, SQLite
locked, full or read-only) opens the breaker, DOWN: writes are skipped at once (the vectors
are simply not stored, and the caller is told), reads raise StoreUnavailable (the API answers
503 with Retry-After), so no request waits for a dead store's timeout. Meanwhile one
background thread probes the store (``ping()``, or opening it if it never opened) with
exponential backoff and jitter. A successful probe moves to TRIAL: calls go through again; the
first one that succeeds closes the breaker (UP), one that fails opens it again with a longer
backoff, as part of the same outage. An outage is logged twice: when it begins and when it ends.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from enum import Enum

import numpy as np

from app.serving.metrics import Metrics
from app.serving.store import EmbeddingStore
from app.serving.store.vector_index import Neighbor, SearchUnavailable

log = logging.getLogger("imgrec.store")


class StoreUnavailable(Exception):
    """The store is down (the breaker is open, or this very call failed)."""


class State(Enum):
    UP = "up"
    DOWN = "down"
    TRIAL = "trial"


def _describe(exc: BaseException) -> str:
    # the exception's class and message: driver messages name the host and port, never a
    # password (the store URL itself is never logged)
    return f"{type(exc).__name__}: {exc}"[:300]


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
        """Open the store; when that fails, serve without it and keep trying in the background.
        A malformed setting (ValueError) is still an error at start-up."""
        try:
            self.store = self._opener()
        except ValueError:
            raise
        except Exception as e:
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
        store = self.store
        if self.state is State.DOWN or store is None:
            self._unstored(len(items))
            return False
        try:
            store.put_many(key, items, filenames)
        except Exception as e:
            self._failed("put", e)
            self._unstored(len(items))
            return False
        self._succeeded()
        return True

    def get_many(self, key: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        store = self.store
        if self.state is State.DOWN or store is None:
            raise StoreUnavailable("the embedding store is unavailable")
        try:
            found = store.get_many(key, ids)
        except Exception as e:
            self._failed("get", e)
            raise StoreUnavailable("the embedding store is unavailable") from e
        self._succeeded()
        return found

    def search(self, key: str, query: np.ndarray, k: int,
               exclude: str | None = None) -> list[Neighbor]:
        """The store's similarity search; a store that cannot search (SearchUnavailable) is
        not an outage."""
        store = self.store
        if self.state is State.DOWN or store is None:
            raise StoreUnavailable("the embedding store is unavailable")
        try:
            found = store.search(key, query, k, exclude)
        except SearchUnavailable:
            raise
        except Exception as e:
            self._failed("search", e)
            raise StoreUnavailable("the embedding store is unavailable") from e
        self._succeeded()
        return found

    def filenames(self, key: str, ids: Sequence[str]) -> dict[str, str | None]:
        store = self.store
        if self.state is State.DOWN or store is None:
            raise StoreUnavailable("the embedding store is unavailable")
        try:
            found = store.filenames(key, ids)
        except Exception as e:
            self._failed("get", e)
            raise StoreUnavailable("the embedding store is unavailable") from e
        self._succeeded()
        return found

    def count(self) -> int:
        store = self.store
        if self.state is State.DOWN or store is None:
            raise StoreUnavailable("the embedding store is unavailable")
        try:
            n = store.count()
        except Exception as e:
            self._failed("count", e)
            raise StoreUnavailable("the embedding store is unavailable") from e
        self._succeeded()
        return n

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
                log.debug("embedding store probe failed: %s", _describe(e))
                with self._lock:
                    self._backoff_s = min(self._backoff_s * 2, self.backoff_max_s)
                continue
            with self._lock:
                self.state = State.TRIAL
                self._prober = None
            return
