"""The similarity index beside the embedding store: exact cosine search, kept in step with it.

The SQLite and memory stores own one ``VectorIndex`` and update it inside the same lock as their
own writes and evictions, so the index holds exactly the vectors the store holds. They change
together or not at all: ``prepare`` checks a write's vectors (unique ids, one length per store
key) and makes room, changing nothing, before the store writes; ``apply``, once the store's
write has committed, adds them and drops the evicted ones, and cannot fail. It is rebuilt
from the store when the store opens (measured in BENCHMARKS.md: faster than reading a persisted
copy would be worth, and never stale). Search is exact: one float32 matrix-vector product over
the store key's unit vectors, then a partial sort; at the store's default bound of 200,000
512-d vectors that is a few tens of milliseconds on one core (BENCHMARKS.md), so no approximate
index and no recall to state. The Redis store searches in Redis itself (redis_search.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Neighbor:
    id: str
    score: float  # cosine similarity, 1.0 = same direction
    filename: str | None


class SearchUnavailable(RuntimeError):
    """The store cannot search (a Redis server without the search module)."""


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

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more rows, so that adding them allocates nothing."""
        n = len(self.ids)
        need = n + extra
        if need > len(self.matrix):  # grow geometrically: amortised O(1) per vector
            grown = np.empty((max(need, 2 * len(self.matrix), 64), self.dim), dtype=np.float32)
            grown[:n] = self.matrix[:n]
            self.matrix = grown

    def add(self, ids: Sequence[str], rows: np.ndarray, names: Sequence[str | None]) -> None:
        """Unit rows under unique ids (VectorIndex.prepare checks both); a known id is a re-put:
        its row is replaced, its filename only by a new one."""
        self.reserve(len(ids))
        targets = np.empty(len(ids), dtype=np.intp)
        for n, (image_id, name) in enumerate(zip(ids, names, strict=True)):
            r = self.row.get(image_id)
            if r is None:
                r = self.row[image_id] = len(self.ids)
                self.ids.append(image_id)
                self.names.append(name)
            elif name is not None:
                self.names[r] = name
            targets[n] = r
        self.matrix[targets] = rows

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


@dataclass(frozen=True, slots=True)
class Addition:
    """Vectors for one store key, checked and scaled to unit rows by VectorIndex.prepare."""

    model: str
    ids: tuple[str, ...]
    rows: np.ndarray  # (len(ids), dim) float32 unit rows
    names: tuple[str | None, ...]


class VectorIndex:
    """Exact cosine nearest neighbours per store key. Thread-safe; every call is O(batch)
    except ``search``, which is one pass over the store key's vectors."""

    def __init__(self) -> None:
        self._parts: dict[str, _Part] = {}
        self._lock = threading.Lock()

    def prepare(self, model: str, ids: Sequence[str],
                vectors: np.ndarray | Sequence[np.ndarray],
                names: Sequence[str | None] | None = None) -> Addition:
        """Check and normalise vectors for ``apply``, changing nothing: the store calls this
        before its own write, so that a refusal (ValueError: repeated ids, ragged or mismatched
        vectors) leaves both unchanged, and ``apply`` after the write cannot fail."""
        names = list(names) if names is not None else [None] * len(ids)
        if not ids:
            return Addition(model, (), np.empty((0, 0), dtype=np.float32), ())
        if len(set(ids)) != len(ids):
            raise ValueError("repeated ids in one addition to the index")
        rows = unit_rows(np.stack(list(vectors)) if not isinstance(vectors, np.ndarray)
                         else vectors)
        if rows.ndim != 2 or rows.shape[1] == 0 or not len(rows) == len(ids) == len(names):
            raise ValueError(f"{len(ids)} ids, {len(names)} names and vectors of shape "
                             f"{rows.shape}: want one 1-d vector per id")
        with self._lock:
            part = self._parts.get(model)
            if part is not None:
                if part.dim != rows.shape[1]:
                    raise ValueError(f"{rows.shape[1]}-d vectors for a store key whose index "
                                     f"holds {part.dim}-d ones")
                part.reserve(len(ids))
        return Addition(model, tuple(ids), rows, tuple(names))

    def apply(self, addition: Addition, evicted: Iterable[tuple[str, str]] = ()) -> None:
        """Add what ``prepare`` checked, then drop the evicted (model, id) pairs. The store
        calls prepare and apply under one lock of its own, so nothing changes in between."""
        with self._lock:
            if addition.ids:
                part = self._parts.get(addition.model)
                if part is None:
                    part = self._parts[addition.model] = _Part(addition.rows.shape[1])
                part.add(addition.ids, addition.rows, addition.names)
            self._remove(evicted)

    def add(self, model: str, ids: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray],
            names: Sequence[str | None] | None = None) -> None:
        self.apply(self.prepare(model, ids, vectors, names))

    def dim(self, model: str) -> int | None:
        """The length of the store key's vectors, None while it has none."""
        with self._lock:
            part = self._parts.get(model)
            return part.dim if part is not None else None

    def remove(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Drop (model, id) pairs; unknown ones are ignored."""
        with self._lock:
            self._remove(pairs)

    def _remove(self, pairs: Iterable[tuple[str, str]]) -> None:
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
