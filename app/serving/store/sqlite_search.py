"""Search in the SQLite store: the approximate index's candidates and the rows it does not hold
yet, re-scored exactly against the stored float32 vectors.

The index (ann_index.py) proposes seqs for the rows up to its watermark; every row after it
(the indexer's backlog, or the whole table while a snapshot is rebuilt, or always when the
index is off) is scanned exactly. The scores are the exact cosine of the stored vectors, the
order is best first with ties by id, so every replica and every run agree, as with the exact
index before. A candidate whose row is gone (evicted since) is simply not found, and a store
key's rows only are read: searches never mix models.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

import numpy as np

from app.serving.store.ann_index import AnnIndex
from app.serving.store.vector_index import Neighbor

_TAIL_CHUNK = 8192


def _score(rows: Iterable[tuple[int, str, bytes, str | None]], q: np.ndarray, dim: int,
           best: dict[int, tuple[float, str, str | None]], keep: int) -> None:
    """Exact cosines of the rows into ``best``; only a chunk's top ``keep`` (and its ties at
    the boundary) become Python entries."""
    rows = [r for r in rows if len(r[2]) == 4 * dim]
    if not rows:
        return
    m = np.frombuffer(b"".join(r[2] for r in rows), "<f4").reshape(len(rows), dim)
    norms = np.sqrt(np.einsum("ij,ij->i", m, m))
    scores = np.divide(m @ q, norms, out=np.zeros(len(rows), np.float32), where=norms > 0)
    if len(rows) > keep:
        floor = np.partition(scores, len(rows) - keep)[len(rows) - keep]
        chosen = np.flatnonzero(scores >= floor).tolist()
    else:
        chosen = list(range(len(rows)))
    for n in chosen:
        seq, image_id, _, name = rows[n]
        best[seq] = (float(scores[n]), image_id, name)


def _prune(best: dict[int, tuple[float, str, str | None]], keep: int) -> None:
    if len(best) > 4 * keep:
        top = sorted(best.items(), key=lambda t: (-t[1][0], t[1][1]))[:keep]
        best.clear()
        best.update(top)


def search(db: sqlite3.Connection, index: AnnIndex | None, model: str, query: np.ndarray,
           k: int, exclude: str | None) -> list[Neighbor]:
    q = np.asarray(query, np.float32).reshape(-1)
    norm = float(np.linalg.norm(q))
    if norm == 0 or k < 1:
        return []  # a zero vector has no direction: nothing is similar to it
    q = q / norm
    dim = q.shape[0]
    want = k + (exclude is not None)
    watermark = index.watermark if index is not None else 0  # read before the candidates
    best: dict[int, tuple[float, str, str | None]] = {}
    if index is not None:
        seqs = index.candidates(model, q, want).tolist()
        if seqs:
            marks = ",".join("?" * len(seqs))
            _score(db.execute(f"SELECT seq, id, vector, filename FROM embeddings WHERE seq IN"
                              f" ({marks}) AND +model = ?", (*seqs, model)),
                   q, dim, best, len(seqs))
    # the rows after the watermark, in seq order (+model: SQLite walks the seq range, not
    # the store key's whole (model, id) index)
    cursor = db.execute("SELECT seq, id, vector, filename FROM embeddings WHERE seq > ?"
                        " AND +model = ?", (watermark, model))
    while chunk := cursor.fetchmany(_TAIL_CHUNK):
        _score(chunk, q, dim, best, want)
        _prune(best, want)
    ranked = sorted(((s, i, n) for s, i, n in best.values() if i != exclude),
                    key=lambda t: (-t[0], t[1]))[:k]
    return [Neighbor(i, min(1.0, max(-1.0, s)), n) for s, i, n in ranked]
