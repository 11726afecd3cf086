"""What every embedding store is: the interface the service calls, its one failure, and the
vector encoding.

A small blocking interface, called from worker threads. Vectors travel as float32 numpy arrays
and are kept as little-endian float32 bytes. A store raises StoreFailure, and only that, for
its own failures: unreachable, timed out, locked, disk full, read-only. The guard (guard.py)
takes those for an outage; anything else a store raises is a bug in our code, which fails the
call that hit it and nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from app.serving.store.vector_index import Neighbor


class StoreFailure(Exception):
    """The store itself failed (connection, timeout, lock, disk, read-only): an outage. The
    driver's exception is its ``__cause__``."""


@contextmanager
def store_failures(is_failure: Callable[[Exception], bool]) -> Iterator[None]:
    """Raise the driver exceptions ``is_failure`` accepts as StoreFailure; let every other
    exception (a bug, a refused argument) through as it is."""
    try:
        yield
    except StoreFailure:
        raise
    except Exception as e:
        if is_failure(e):
            raise StoreFailure(f"{type(e).__name__}: {e}") from e
        raise


class EmbeddingStore(Protocol):
    def put_many(self, model: str, items: Sequence[tuple[str, np.ndarray]],
                 filenames: Sequence[str | None] | None = None) -> None:
        """Store vectors under (model, id); a repeated id replaces and refreshes its entry.
        ``filenames`` (one per item, None = none given) are kept beside the vectors; a re-put
        without a filename keeps the one stored before. One call is its items one after the
        other, the bound applied at its end: an id given twice is stored once, with its last
        vector and the last filename given for it (``unique_items``)."""

    def get_many(self, model: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The vectors found for these ids (unknown ids are simply absent)."""

    def count(self) -> int:
        """Number of vectors held (all models)."""

    def ping(self) -> None:
        """Raise StoreFailure unless the store can take a write now (the outage probe,
        guard.py)."""

    def search(self, model: str, query: np.ndarray, k: int,
               exclude: str | None = None) -> list[Neighbor]:
        """The k stored vectors of this model most cosine-similar to query, best first, never
        ``exclude``. Raises vector_index.SearchUnavailable where the store cannot search."""

    def filenames(self, model: str, ids: Sequence[str]) -> dict[str, str | None]:
        """The stored filename of each of these ids that is stored."""

    def close(self) -> None: ...


def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


@dataclass(frozen=True, slots=True)
class Batch:
    """One put_many call's items, each id once."""

    ids: list[str]
    vectors: list[np.ndarray]  # 1-d, all of one length
    names: list[str | None]  # None: none given (a stored one is kept)


def unique_items(items: Sequence[tuple[str, np.ndarray]],
                 filenames: Sequence[str | None] | None) -> Batch:
    """The items with each id once, as the same items put one at a time would leave them: its
    last vector, the last filename given for it, in the order of their last occurrence (so the
    last is the youngest). Raises ValueError for filenames that do not match the items, or
    vectors that are not 1-d of one length: refused before any store is written."""
    merged: dict[str, tuple[np.ndarray, str | None]] = {}
    for (image_id, vector), name in zip(items, names_for(items, filenames), strict=True):
        before = merged.pop(image_id, None)
        merged[image_id] = (vector, name if name is not None or before is None else before[1])
    vectors = [np.asarray(v) for v, _ in merged.values()]
    if any(v.ndim != 1 or v.shape != vectors[0].shape or not v.size for v in vectors):
        raise ValueError("vectors of one put must be 1-d, of one length, and not empty: got "
                         f"shapes {sorted({v.shape for v in vectors})}")
    return Batch(list(merged), vectors, [name for _, name in merged.values()])


def names_for(items: Sequence[object],
               filenames: Sequence[str | None] | None) -> Sequence[str | None]:
    if filenames is None:
        return [None] * len(items)
    if len(filenames) != len(items):
        raise ValueError(f"{len(filenames)} filenames for {len(items)} vectors")
    return filenames
