"""What every embedding store is: the interface the service calls, and the vector encoding.

A small blocking interface, called from worker threads. Vectors travel as float32 numpy arrays
and are kept as little-endian float32 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from app.serving.store.vector_index import Neighbor


class EmbeddingStore(Protocol):
    def put_many(self, model: str, items: Sequence[tuple[str, np.ndarray]],
                 filenames: Sequence[str | None] | None = None) -> None:
        """Store vectors under (model, id); a repeated id replaces and refreshes its entry.
        ``filenames`` (one per item, None = none given) are kept beside the vectors; a re-put
        without a filename keeps the one stored before."""

    def get_many(self, model: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The vectors found for these ids (unknown ids are simply absent)."""

    def count(self) -> int:
        """Number of vectors held (all models)."""

    def ping(self) -> None:
        """Raise unless the store can take a write now (the outage probe, guard.py)."""

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


def names_for(items: Sequence[object],
               filenames: Sequence[str | None] | None) -> Sequence[str | None]:
    if filenames is None:
        return [None] * len(items)
    if len(filenames) != len(items):
        raise ValueError(f"{len(filenames)} filenames for {len(items)} vectors")
    return filenames
