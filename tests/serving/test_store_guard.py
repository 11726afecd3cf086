"""The guard opens its breaker for the store's own failures only.

A bug in our code (an IndexError in the index, a ValueError, SQL that SQLite refuses as a syntax
error) is logged with its traceback and fails only the call that hit it: the breaker stays
closed, and the other calls go through. A locked or read-only SQLite file is an outage, as
before. No probe runs during these tests (the first would come after a minute), so nothing
here waits on time.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from app.serving.metrics import Metrics
from app.serving.store import MemoryStore, SQLiteStore
from app.serving.store.guard import GuardedStore, State, StoreUnavailable

KEY = "m" * 64
NO_PROBE = {"backoff_min_s": 60.0, "backoff_max_s": 60.0}


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(8).astype(np.float32)


class BuggyStore(MemoryStore):
    """A memory store with a bug: any call that touches the id "bug" raises."""

    def __init__(self, error: type[Exception]) -> None:
        super().__init__(100)
        self.error = error

    def put_many(self, model: str, items: Sequence[tuple[str, np.ndarray]],
                 filenames: Sequence[str | None] | None = None) -> None:
        if any(i == "bug" for i, _ in items):
            raise self.error("index 0 is out of bounds for axis 0 with size 0")
        super().put_many(model, items, filenames)

    def get_many(self, model: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if "bug" in ids:
            raise self.error("a bug in a read")
        return super().get_many(model, ids)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


@pytest.fixture()
def metrics() -> Metrics:
    return Metrics()


@contextmanager
def guarded(store: MemoryStore | SQLiteStore, metrics: Metrics) -> Iterator[GuardedStore]:
    guard = GuardedStore(lambda: store, metrics, **NO_PROBE)
    guard.start()
    try:
        yield guard
    finally:
        guard.close()


@pytest.mark.parametrize("error", [IndexError, ValueError, TypeError])
def test_a_bug_in_a_write_fails_only_that_write(error: type[Exception], metrics: Metrics,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="imgrec.store")
    with guarded(BuggyStore(error), metrics) as guard:
        assert guard.put_many(KEY, [("a", vec(1))]) is True
        assert guard.put_many(KEY, [("bug", vec(2)), ("b", vec(3))]) is False
        # the breaker did not open: the next calls, of this client or another, go through
        assert guard.state is State.UP
        assert guard.put_many(KEY, [("c", vec(4))]) is True
        assert sorted(guard.get_many(KEY, ["a", "b", "c"])) == ["a", "c"]
        assert sample(metrics, "imgrec_store_outages_total") == 0
        assert sample(metrics, "imgrec_store_up") == 1
        assert sample(metrics, "imgrec_store_unstored_images_total") == 2  # that call's two
        assert sample(metrics, "imgrec_store_errors_total", op="put") == 1
        bugs = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(bugs) == 1 and "a bug, not an outage" in bugs[0].getMessage()
        assert bugs[0].exc_info is not None and bugs[0].exc_info[0] is error  # the traceback
        assert not any("unavailable" in r.getMessage() for r in caplog.records)


def test_a_bug_in_a_read_is_raised_on_and_opens_nothing(metrics: Metrics) -> None:
    with guarded(BuggyStore(IndexError), metrics) as guard:
        guard.put_many(KEY, [("a", vec(1))])
        with pytest.raises(IndexError):  # not StoreUnavailable: that one request answers 500
            guard.get_many(KEY, ["a", "bug"])
        assert guard.state is State.UP
        assert sorted(guard.get_many(KEY, ["a"])) == ["a"]
        assert sample(metrics, "imgrec_store_outages_total") == 0


def test_a_bug_at_start_up_is_not_taken_for_an_outage(metrics: Metrics) -> None:
    def opener() -> MemoryStore:
        raise TypeError("a bug in the opener")

    guard = GuardedStore(opener, metrics, **NO_PROBE)
    with pytest.raises(TypeError):
        guard.start()
    guard.close()
    assert sample(metrics, "imgrec_store_outages_total") == 0


@pytest.fixture()
def sqlite_guard(tmp_path: Path, metrics: Metrics) -> Iterator[tuple[GuardedStore, SQLiteStore]]:
    store = SQLiteStore(tmp_path / "emb.sqlite3", 100, timeout_s=0.05)
    with guarded(store, metrics) as guard:
        assert guard.put_many(KEY, [("a", vec(1))]) is True
        yield guard, store


def test_sqlite_locked_by_another_process_is_an_outage(
        sqlite_guard: tuple[GuardedStore, SQLiteStore], tmp_path: Path,
        metrics: Metrics) -> None:
    guard, _ = sqlite_guard
    other = sqlite3.connect(tmp_path / "emb.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        assert guard.put_many(KEY, [("b", vec(2))]) is False  # database is locked
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert guard.state is State.DOWN
    assert sample(metrics, "imgrec_store_outages_total") == 1
    with pytest.raises(StoreUnavailable):  # until a probe answers
        guard.get_many(KEY, ["a"])


def test_sqlite_read_only_is_an_outage(sqlite_guard: tuple[GuardedStore, SQLiteStore],
                                       metrics: Metrics) -> None:
    guard, store = sqlite_guard
    with store._lock:
        store._db.execute("PRAGMA query_only = ON")  # writes fail with SQLITE_READONLY
    assert guard.put_many(KEY, [("b", vec(2))]) is False
    assert guard.state is State.DOWN
    assert sample(metrics, "imgrec_store_outages_total") == 1


def test_sql_that_sqlite_refuses_is_a_bug_not_an_outage(
        sqlite_guard: tuple[GuardedStore, SQLiteStore], metrics: Metrics,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite raises OperationalError for its own failures and for our mistakes alike; its
    result code tells them apart (SQLITE_ERROR: the statement is wrong)."""
    guard, store = sqlite_guard

    def wrong_sql(*_: object) -> list[tuple[str, str]]:
        store._db.execute("SELEC 1")
        return []

    monkeypatch.setattr(store, "_write", wrong_sql)
    assert guard.put_many(KEY, [("b", vec(2))]) is False
    assert guard.state is State.UP
    assert sample(metrics, "imgrec_store_outages_total") == 0
    monkeypatch.undo()
    assert guard.put_many(KEY, [("c", vec(3))]) is True
    # the failed write's transaction was rolled back, and the index did not take its vector
    assert sorted(guard.get_many(KEY, ["a", "b", "c"])) == ["a", "c"]
    assert sorted(n.id for n in guard.search(KEY, vec(1), 10)) == ["a", "c"]
