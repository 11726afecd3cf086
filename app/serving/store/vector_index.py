"""The similarity index beside the embedding store: exact cosine search, kept in step with it.

The SQLite and memory stores own one ``VectorIndex`` and update it inside the same lock as their
own writes and evictions, so the index holds exactly the vectors the store holds. It is rebuilt
from the store when the store opens (measured in BENCHMARKS.md: faster than reading a persisted
copy would be worth, and never stale). Search is exact: one float32 matrix-vector product over
the store key's unit vectors, then a partial sort; at the store's default bound of 200,000
512-d vectors that is a few tens of milliseconds on one core (BENCHMARKS.md), so no approximate
index and no recall to state. The Redis store searches in Redis itself (search_redis.py).
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

MAX_FILENAME_CHARS = 255


@dataclass(frozen=True, slots=True)
class Neighbor:
    id: str
    score: float  # cosine similarity, 1.0 = same direction
    filename: str | None


class SearchUnavailable(RuntimeError):
    """The store cannot search (a Redis server without the search module)."""


def clean_filename(name: str | None) -> str | None:
    """A client's filename as it may be stored and shown: no control or format characters, no
    surrounding blanks, at most MAX_FILENAME_CHARS characters; None when nothing is left."""
    if name is None:
        return None
    kept = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf", "Cs"))
    kept = kept.strip()[:MAX_FILENAME_CHARS]
    return kept or None


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero: it matches nothing)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


class _Part:
    """One store key's vectors: a growable matrix of unit rows, row -> id, id -> row."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.matrix = np.empty((0, dim), dtype=np.float32)
        self.ids: list[str] = []
        self.names: list[str | None] = []
        self.row: dict[str, int] = {}

    def add(self, ids: Sequence[str], vectors: np.ndarray, names: Sequence[str | None]) -> None:
        fresh: list[int] = []
        for i, image_id in enumerate(ids):
            r = self.row.get(image_id)
            if r is None:
                fresh.append(i)
                self.row[image_id] = len(self.ids) + len(fresh) - 1
            else:  # a re-put: same bytes, so the same vector; the filename may be new
                self.matrix[r] = vectors[i]
                if names[i] is not None:
                    self.names[r] = names[i]
        if not fresh:
            return
        n = len(self.ids)
        need = n + len(fresh)
        if need > len(self.matrix):  # grow geometrically: amortised O(1) per vector
            grown = np.empty((max(need, 2 * len(self.matrix), 64), self.dim), dtype=np.float32)
            grown[:n] = self.matrix[:n]
            self.matrix = grown
        self.matrix[n:need] = vectors[fresh]
        self.ids += [ids[i] for i in fresh]
        self.names += [names[i] for i in fresh]

    def remove(self, image_id: str) -> None:
        r = self.row.pop(image_id, None)
        if r is None:
            return
        last = len(self.ids) - 1
        if r != last:  # move the last row into the hole: O(1), order does not matter
            self.matrix[r] = self.matrix[last]
            self.ids[r] = self.ids[last]
            self.names[r] = self.names[last]
            self.row[self.ids[r]] = r
        self.ids.pop()
        self.names.pop()
        if len(self.matrix) > 1024 and last < len(self.matrix) // 4:  # give memory back
            self.matrix = self.matrix[:max(last, 64)].copy()

    def search(self, query: np.ndarray, k: int, exclude: str | None) -> list[Neighbor]:
        n = len(self.ids)
        if n == 0:
            return []
        scores = self.matrix[:n] @ query
        skip = self.row.get(exclude) if exclude is not None else None
        if skip is not None:
            scores[skip] = -np.inf
            n -= 1
        take = min(k, n)
        if take <= 0:
            return []
        top = np.argpartition(-scores, take - 1)[:take] if take < len(scores) else \
            np.arange(len(scores))
        # best first; ties broken by id so that every replica and every run agree
        order = sorted(top.tolist(), key=lambda r: (-float(scores[r]), self.ids[r]))[:take]
        return [Neighbor(self.ids[r], min(1.0, max(-1.0, float(scores[r]))), self.names[r])
                for r in order]


class VectorIndex:
    """Exact cosine nearest neighbours per store key. Thread-safe; every call is O(batch)
    except ``search``, which is one pass over the store key's vectors."""

    def __init__(self) -> None:
        self._parts: dict[str, _Part] = {}
        self._lock = threading.Lock()

    def add(self, model: str, ids: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray],
            names: Sequence[str | None] | None = None) -> None:
        if not ids:
            return
        rows = unit_rows(np.stack(list(vectors)) if not isinstance(vectors, np.ndarray)
                         else vectors)
        with self._lock:
            part = self._parts.get(model)
            if part is None or part.dim != rows.shape[1]:
                part = self._parts[model] = _Part(rows.shape[1])
            part.add(ids, rows, names if names is not None else [None] * len(ids))

    def remove(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Drop (model, id) pairs; unknown ones are ignored."""
        with self._lock:
            for model, image_id in pairs:
                part = self._parts.get(model)
                if part is not None:
                    part.remove(image_id)
                    if not part.ids:
                        del self._parts[model]

    def search(self, model: str, query: np.ndarray, k: int,
               exclude: str | None = None) -> list[Neighbor]:
        q = unit_rows(np.asarray(query, dtype=np.float32).reshape(-1))
        with self._lock:
            part = self._parts.get(model)
            if part is None or part.dim != q.shape[0]:
                return []
            return part.search(q, k, exclude)

    def filename(self, model: str, image_id: str) -> str | None:
        with self._lock:
            part = self._parts.get(model)
            r = part.row.get(image_id) if part is not None else None
            return part.names[r] if part is not None and r is not None else None

    def __len__(self) -> int:
        with self._lock:
            return sum(len(p.ids) for p in self._parts.values())
