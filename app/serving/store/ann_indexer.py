"""The background indexer: keeps the approximate index (ann_index.py) caught up with the SQLite
table, off the request path, and saves its snapshot.

The backlog is the table itself: the rows after the index's watermark. A write never waits for
the index; it only wakes this thread (``notify``) after its commit, and hands over the seqs it
evicted or replaced (``forget``). The thread reads the rows after the watermark in seq order
through a connection of its own, adds them, and moves the watermark; rows another process
wrote (``imgrec index`` into the same file) are found the same way, at the latest after
``POLL_S``. So the backlog is bounded by the store's own bound, and nothing in it is lost: a
crash between a store write and the index leaves the rows in the table, after the snapshot's
watermark, and the next start replays them. Until a row is indexed, searches find it through
the exact scan of the rows after the watermark (sqlite_search.py): at saturation the backlog
grows, searches pay for its scan, and it is worked off once the load drops. The thread runs
at a lower CPU priority (nice +10, this thread only), so serving wins the cores it needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import IO

import numpy as np

from app.serving.store.ann_index import AnnIndex
from app.serving.store.ann_snapshot import SnapshotInvalid

log = logging.getLogger("imgrec.index")
POLL_S = 1.0  # longest sleep between looks at the table (rows written by another process)
BATCH = 1024  # rows read and added per step
# After a wake-up, how long the writes of a burst gather before one step indexes them all: a
# step per request cost ~0.4 ms of CPU at concurrency 1 (its reads and bookkeeping), measured
# with bench/profile_serve.py; a stored vector is still searchable well within a second.
GATHER_S = 0.1


class AnnIndexer:
    def __init__(self, db_path: Path, index: AnnIndex, generation: int,
                 save_interval_s: float = 60.0) -> None:
        self.db_path = db_path
        self.folder = Path(str(db_path) + ".ann")
        self.index = index
        self.generation = generation
        self.save_interval_s = save_interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._moved = threading.Condition()
        self._removals: list[tuple[str, int]] = []
        self._removals_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loaded = False  # a snapshot was loaded: make it writable and reconcile it
        self._lock_file: IO[bytes] | None = None
        self._saved_at = (0, 0)  # (watermark, removals applied) of the last save
        self._last_save = 0.0
        self._removed = 0

    # -- start and stop ----------------------------------------------------------------------
    def open(self) -> None:
        """Load the snapshot (checked, then read into memory), or say why not and start from
        nothing; either way the catching up happens in the background."""
        try:
            self.index.load(self.folder, self.generation)
            self._loaded = True
            log.info("loaded the search index snapshot of %s: %d vectors up to row %d",
                     self.db_path, len(self.index), self.index.watermark)
        except (SnapshotInvalid, RuntimeError, ValueError, OSError) as e:
            self._rebuild(str(e))

    def _rebuild(self, why: str) -> None:
        self.index.clear()
        self._loaded = False
        log.warning("search index of %s: %s; rebuilding it from the store in the background "
                    "(searches are exact over the rows not yet indexed meanwhile)",
                    self.db_path, why)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ann-indexer", daemon=True)
        self._thread.start()

    def close(self, save: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        if save:
            self._save()
        if self._lock_file is not None:
            self._lock_file.close()

    # -- what writers call ---------------------------------------------------------------------
    def notify(self) -> None:
        self._wake.set()

    def forget(self, pairs: list[tuple[str, int]]) -> None:
        """(store key, seq) of rows deleted (evicted or replaced): out of the index."""
        if pairs:
            with self._removals_lock:
                self._removals += pairs
            self._wake.set()

    def wait_indexed(self, seq: int, timeout_s: float) -> bool:
        """Block until every row up to ``seq`` is in the index, at most timeout_s."""
        with self._moved:
            return self._moved.wait_for(lambda: self.index.watermark >= seq, timeout_s)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: this thread only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        db = sqlite3.connect(str(self.db_path), timeout=30)  # reads only
        try:
            if self._loaded:
                self._reconcile(db)
            while not self._stop.is_set():
                busy = self._step(db)
                if not busy:
                    self._maybe_save()
                    if self._wake.wait(POLL_S):
                        self._stop.wait(GATHER_S)
                    self._wake.clear()
        except Exception:
            log.exception("the search indexer stopped (searches stay exact over the rows it "
                          "did not index)")
        finally:
            db.close()

    def _step(self, db: sqlite3.Connection) -> bool:
        """Apply removals, then index the next rows; True while more are waiting."""
        with self._removals_lock:
            removals, self._removals = self._removals, []
        by_model: dict[str, list[int]] = {}
        for model, seq in removals:
            by_model.setdefault(model, []).append(seq)
        for model, seqs in by_model.items():
            self.index.remove(model, seqs)
        self._removed += len(removals)
        rows = db.execute("SELECT seq, model, vector FROM embeddings WHERE seq > ?"
                          " ORDER BY seq LIMIT ?", (self.index.watermark, BATCH)).fetchall()
        if not rows:
            return False
        self._add(rows)
        with self._moved:
            self.index.watermark = rows[-1][0]
            self._moved.notify_all()
        return len(rows) == BATCH

    def _add(self, rows: list[tuple[int, str, bytes]]) -> None:
        groups: dict[str, list[tuple[int, bytes]]] = {}
        for seq, model, blob in rows:
            groups.setdefault(model, []).append((seq, blob))
        for model, entries in groups.items():
            dim = self.index.dim(model) or len(entries[0][1]) // 4
            same = [e for e in entries if len(e[1]) == 4 * dim]
            if len(same) < len(entries):  # only a file written by something else holds these
                log.warning("%d vectors of another length than their store key's are not "
                            "indexed", len(entries) - len(same))
            if same and dim:
                vectors = np.frombuffer(b"".join(b for _, b in same), "<f4").reshape(-1, dim)
                self.index.add(model, np.array([s for s, _ in same]), vectors)

    def _reconcile(self, db: sqlite3.Connection) -> None:
        """A loaded snapshot against the table: rows deleted since it was saved (a crash
        before the next save) leave it; rows it should hold but does not make it stale."""
        top = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'embeddings'").fetchone()
        if self.index.watermark > (top[0] if top else 0):
            self._rebuild("stale snapshot: it covers rows the store never wrote")
            return
        for model in self.index.models():
            held = self.index.keys(model)
            stored = np.fromiter((r[0] for r in db.execute(
                "SELECT seq FROM embeddings WHERE seq <= ? AND +model = ?",
                (self.index.watermark, model))), np.int64)
            if np.setdiff1d(stored, held, assume_unique=True).size:
                self._rebuild("stale snapshot: rows it should hold are missing")
                return
            gone = np.setdiff1d(held, stored, assume_unique=True)
            self.index.remove(model, gone)

    # -- the snapshot --------------------------------------------------------------------------
    def _maybe_save(self) -> None:
        if self._saved_at == (self.index.watermark, self._removed):
            return
        if time.monotonic() - self._last_save >= self.save_interval_s:
            self._save()

    def _save(self) -> None:
        state = (self.index.watermark, self._removed)
        if state == self._saved_at or not self._own_folder():
            return
        started = time.monotonic()
        try:
            self.index.save(self.folder, self.generation)
        except (OSError, RuntimeError) as e:  # a full or read-only disk (usearch: RuntimeError)
            log.warning("could not save the search index snapshot: %s", e)
            return
        self._saved_at, self._last_save = state, time.monotonic()
        log.info("saved the search index snapshot (%d vectors up to row %d) in %.2f s",
                 len(self.index), state[0], self._last_save - started)

    def _own_folder(self) -> bool:
        """One writer of the snapshot per store file (an advisory lock, held until close)."""
        if self._lock_file is not None:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        f = (self.folder / "lock").open("ab")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            log.info("another process saves the search index snapshot of %s", self.db_path)
            return False
        self._lock_file = f
        return True
