"""The embedded default store: a bounded table in one SQLite file (WAL), with its similarity
index rebuilt from the table when it opens.

Each put_many is one IMMEDIATE transaction: its rows in (REPLACE: a re-put is the youngest
again), then the oldest rows beyond max_items out, the row count kept in the file beside them.
The index is checked before the transaction and updated only after it commits (vector_index.py),
so a failed write leaves both as they were. SQLite's own failures (locked past the busy timeout,
disk full, read-only, cannot open) are raised as StoreFailure; SQL that SQLite refuses is a bug.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from app.serving.store.base import from_blob, store_failures, to_blob, unique_items
from app.serving.store.vector_index import Neighbor, VectorIndex

log = logging.getLogger("imgrec.store")
_CHUNK = 500  # ids per IN (...) list: far below SQLite's limit on bound parameters

# SQLite's primary result codes that are the store's own failures, not our code's: the file
# cannot be opened, written or trusted (permissions, read-only, full, I/O, corrupt), or another
# connection holds a lock past the busy timeout. A syntax error or a constraint (SQLITE_ERROR,
# SQLITE_CONSTRAINT, SQLITE_MISUSE...) is a bug, and so is every ProgrammingError or
# InterfaceError (they carry no code).
_FAILURE_CODES = frozenset({
    sqlite3.SQLITE_PERM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOLFS, sqlite3.SQLITE_AUTH,
    sqlite3.SQLITE_NOTADB})


def _is_failure(e: Exception) -> bool:
    """The disk or the file (OSError: a directory that cannot be made, no space), or SQLite
    reporting one of _FAILURE_CODES (an extended code's low byte is its primary code)."""
    if isinstance(e, OSError):
        return True
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(e, sqlite3.DatabaseError) and isinstance(code, int) and \
        code & 0xFF in _FAILURE_CODES


class SQLiteStore:
    """A bounded table in one SQLite file (WAL): survives restarts, oldest entries evicted.
    Its own failures (locked, full, read-only, cannot open) are raised as StoreFailure."""

    def __init__(self, path: str | Path, max_items: int, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.max_items = max_items
        self._lock = threading.Lock()
        self._index = VectorIndex()
        with store_failures(_is_failure):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # timeout_s: how long a write waits for another process's lock before it fails
            self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None, timeout=timeout_s)
            try:
                self._prepare_file()
                # The similarity index is rebuilt from the table: it can never disagree with it.
                self._load_index()
            except BaseException:
                self._db.close()
                raise

    def _prepare_file(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS embeddings ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " model TEXT NOT NULL, id TEXT NOT NULL, vector BLOB NOT NULL,"
            " UNIQUE (model, id))"
        )
        # one row rewritten by ping(): a committed write, the only true test of a full disk
        self._db.execute("CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL)")
        # Files from before filenames were kept gain the column (NULL for their rows).
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(embeddings)")}
        if "filename" not in columns:
            self._db.execute("ALTER TABLE embeddings ADD COLUMN filename TEXT")
        # The row count the bound is checked against (_write); counted again at every open,
        # so a file from before it, or one changed by hand, starts out right.
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY,"
                         " value INTEGER NOT NULL)")
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta (name, value)"
                             " VALUES ('rows', (SELECT COUNT(*) FROM embeddings))")

    @contextmanager
    def _connection(self) -> Iterator[None]:
        """One call on the connection: under the lock, SQLite's own failures raised as
        StoreFailure."""
        with self._lock, store_failures(_is_failure):
            yield

    def _load_index(self, chunk: int = 20_000) -> None:
        last, skipped = -1, 0
        while True:
            rows = self._db.execute(
                "SELECT seq, model, id, vector, filename FROM embeddings WHERE seq > ?"
                " ORDER BY seq LIMIT ?", (last, chunk)).fetchall()
            if not rows:
                break
            by_model: dict[str, list[tuple[str, bytes, str | None]]] = {}
            for _, model, image_id, blob, name in rows:
                by_model.setdefault(model, []).append((image_id, blob, name))
            for model, entries in by_model.items():
                # one length per store key (the first one read), as put_many allows
                dim = self._index.dim(model) or len(entries[0][1]) // 4
                same = [e for e in entries if len(e[1]) == 4 * dim and dim]
                skipped += len(entries) - len(same)
                vectors = np.frombuffer(b"".join(e[1] for e in same), dtype="<f4")
                self._index.add(model, [e[0] for e in same], vectors.reshape(len(same), dim),
                                [e[2] for e in same])
            last = rows[-1][0]
        if skipped:  # only a file written by something else than this class holds such rows
            log.warning("%s: %d vectors of another length than their store key's are not "
                        "searchable", self.path, skipped)

    def put_many(self, model: str, items: Sequence[tuple[str, np.ndarray]],
                 filenames: Sequence[str | None] | None = None) -> None:
        batch = unique_items(items, filenames)
        if not batch.ids:
            return
        rows = [(model, image_id, to_blob(vec), name, model, image_id)
                for image_id, vec, name in zip(batch.ids, batch.vectors, batch.names,
                                               strict=True)]
        with self._connection():
            # checked before the transaction: a refusal leaves the table and the index as they
            # were, and the index, updated only once the transaction has committed, cannot fail
            addition = self._index.prepare(model, batch.ids, batch.vectors, batch.names)
            with self._transaction():
                evicted = self._write(model, batch.ids, rows)
            self._index.apply(addition, evicted)

    def _write(self, model: str, ids: list[str], rows: Sequence[tuple[object, ...]]
               ) -> list[tuple[str, str]]:
        """Inside the write transaction: the rows in, then the oldest rows out beyond the
        bound; returns the evicted (model, id) pairs."""
        known = 0
        for n in range(0, len(ids), _CHUNK):
            part = ids[n:n + _CHUNK]
            known += self._db.execute(
                "SELECT COUNT(*) FROM embeddings WHERE model = ? AND id IN"
                f" ({','.join('?' * len(part))})", (model, *part)).fetchone()[0]
        # REPLACE deletes the old row and inserts a new one: a re-seen image is fresh again;
        # without a new filename it keeps the old one (VALUES run first)
        self._db.executemany(
            "INSERT OR REPLACE INTO embeddings (model, id, vector, filename) VALUES"
            " (?, ?, ?, COALESCE(?, (SELECT filename FROM embeddings"
            " WHERE model = ? AND id = ?)))", rows)
        # The bound counts rows, not seq numbers: a re-put leaves a hole in the seq range, so
        # "seq <= MAX(seq) - max_items" would evict while the table is not full. COUNT(*) is a
        # scan of the whole (model, id) index, so the count is kept in the file itself (meta),
        # written by the same transaction as the rows.
        held = self._held() + len(ids) - known
        evicted: list[tuple[str, str]] = []
        if held > self.max_items:
            evicted = self._db.execute(
                "DELETE FROM embeddings WHERE seq IN (SELECT seq FROM embeddings ORDER BY seq"
                " LIMIT ?) RETURNING model, id", (held - self.max_items,)).fetchall()
        self._db.execute("UPDATE meta SET value = ? WHERE name = 'rows'",
                         (held - len(evicted),))
        return evicted

    def _held(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE name = 'rows'").fetchone()[0])

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction. IMMEDIATE: the write lock is taken first, so that what it
        reads (the row count) is not changed by another process before it writes."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite has already rolled back after some errors (SQLITE_FULL, for one)
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def get_many(self, model: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._connection():
            rows = self._db.execute(
                f"SELECT id, vector FROM embeddings WHERE model = ? AND id IN ({marks})",
                (model, *ids)).fetchall()
        return {image_id: from_blob(blob) for image_id, blob in rows}

    def count(self) -> int:
        with self._connection():
            return int(self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])

    def ping(self) -> None:
        with self._connection():
            self._db.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (time.time(),))

    def search(self, model: str, query: np.ndarray, k: int,
               exclude: str | None = None) -> list[Neighbor]:
        return self._index.search(model, query, k, exclude)

    def filenames(self, model: str, ids: Sequence[str]) -> dict[str, str | None]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._connection():
            rows = self._db.execute(
                f"SELECT id, filename FROM embeddings WHERE model = ? AND id IN ({marks})",
                (model, *ids)).fetchall()
        return dict(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
