"""The embedded default store: a bounded table in one SQLite file (WAL), with an approximate
similarity index beside it that persists and is updated off the request path.

Each put_many is one IMMEDIATE transaction: its rows in (REPLACE: a re-put is the youngest
again), then the oldest rows beyond max_items out, the row count kept in the file beside them.
The write never waits for the index: after the commit it wakes the background indexer
(ann_indexer.py) and hands it the seqs it deleted; searches re-score the index's candidates
and the rows it has not reached yet exactly (sqlite_search.py). The index's snapshot lives in
``<file>.ann/`` and is loaded, not rebuilt, when the store opens. With ``ann=False`` every
search is an exact scan of the table. SQLite's own failures (locked past the busy timeout,
disk full, read-only, cannot open) are raised as StoreFailure; SQL that SQLite refuses is a bug.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from app.serving.store import sqlite_search
from app.serving.store.ann_index import AnnIndex, AnnParams
from app.serving.store.ann_indexer import AnnIndexer
from app.serving.store.base import from_blob, store_failures, to_blob, unique_items
from app.serving.store.vector_index import Neighbor

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

    def __init__(self, path: str | Path, max_items: int, timeout_s: float = 5.0,
                 ann: bool = True, ann_params: AnnParams | None = None) -> None:
        self.path = Path(path)
        self.max_items = max_items
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._dims: dict[str, int] = {}  # each store key's vector length, as first stored
        self._readers = threading.local()  # one read connection per searching thread
        self._reader_list: list[sqlite3.Connection] = []
        self.index: AnnIndex | None = None
        self.indexer: AnnIndexer | None = None
        with store_failures(_is_failure):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # timeout_s: how long a write waits for another process's lock before it fails
            self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None, timeout=timeout_s)
            try:
                generation = self._prepare_file()
            except BaseException:
                self._db.close()
                raise
        if ann:
            self.index = AnnIndex(ann_params)
            self.indexer = AnnIndexer(self.path, self.index, generation)
            self.indexer.open()
            self.indexer.start()

    def _prepare_file(self) -> int:
        """Tables in place; returns the file's generation (a random number of its own, so
        that an index snapshot is never applied to another file)."""
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
            self._db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('generation', ?)",
                             (secrets.randbits(62),))
        return int(self._db.execute("SELECT value FROM meta WHERE name = 'generation'")
                   .fetchone()[0])

    @contextmanager
    def _connection(self) -> Iterator[None]:
        """One call on the connection: under the lock, SQLite's own failures raised as
        StoreFailure."""
        with self._lock, store_failures(_is_failure):
            yield

    def _check_dim(self, model: str, dim: int) -> None:
        """One vector length per store key (the first one stored), as the stores agree."""
        known = self._dims.get(model)
        if known is None:
            row = self._db.execute("SELECT length(vector) FROM embeddings WHERE model = ?"
                                   " LIMIT 1", (model,)).fetchone()
            known = self._dims[model] = row[0] // 4 if row else dim
        if known != dim:
            raise ValueError(f"{dim}-d vectors for a store key that holds {known}-d ones")

    def put_many(self, model: str, items: Sequence[tuple[str, np.ndarray]],
                 filenames: Sequence[str | None] | None = None) -> None:
        batch = unique_items(items, filenames)
        if not batch.ids:
            return
        rows = [(model, image_id, to_blob(vec), name, model, image_id)
                for image_id, vec, name in zip(batch.ids, batch.vectors, batch.names,
                                               strict=True)]
        with self._connection():
            self._check_dim(model, len(batch.vectors[0]))  # a refusal changes nothing
            with self._transaction():
                deleted = self._write(model, batch.ids, rows)
        if self.indexer is not None:  # after the commit; the index catches up on its own
            self.indexer.forget(deleted)
            self.indexer.notify()

    def _write(self, model: str, ids: list[str], rows: Sequence[tuple[object, ...]]
               ) -> list[tuple[str, int]]:
        """Inside the write transaction: the rows in, then the oldest rows out beyond the
        bound; returns the (model, seq) of every row deleted (replaced or evicted)."""
        replaced: list[tuple[str, int]] = []
        for n in range(0, len(ids), _CHUNK):
            part = ids[n:n + _CHUNK]
            replaced += [(model, r[0]) for r in self._db.execute(
                "SELECT seq FROM embeddings WHERE model = ? AND id IN"
                f" ({','.join('?' * len(part))})", (model, *part))]
        known = len(replaced)
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
        evicted: list[tuple[str, int]] = []
        if held > self.max_items:
            evicted = self._db.execute(
                "DELETE FROM embeddings WHERE seq IN (SELECT seq FROM embeddings ORDER BY seq"
                " LIMIT ?) RETURNING model, seq", (held - self.max_items,)).fetchall()
        self._db.execute("UPDATE meta SET value = ? WHERE name = 'rows'",
                         (held - len(evicted),))
        return replaced + evicted

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
        with store_failures(_is_failure):
            return sqlite_search.search(self._reader(), self.index, model, query, k, exclude)

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection: in WAL mode a search never waits for a write, nor a
        write for a search's scan."""
        db: sqlite3.Connection | None = getattr(self._readers, "db", None)
        if db is None:
            db = sqlite3.connect(str(self.path), check_same_thread=False,
                                 isolation_level=None, timeout=self._timeout_s)
            self._readers.db = db
            with self._lock:
                self._reader_list.append(db)
        return db

    def wait_indexed(self, timeout_s: float) -> bool:
        """Block until the index holds every row stored so far, at most timeout_s; False
        without an index or when the time ran out."""
        if self.indexer is None:
            return False
        with self._connection():
            top = self._db.execute("SELECT MAX(seq) FROM embeddings").fetchone()[0] or 0
        return self.indexer.wait_indexed(top, timeout_s)

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
        if self.indexer is not None:
            self.indexer.close()
        with self._lock:
            self._db.close()
            for db in self._reader_list:
                db.close()
            self._reader_list.clear()
