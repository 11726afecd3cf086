"""The process-local store: a bounded LRU in memory, for tests and for deployments that want no
persistence."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from app.serving.store.base import from_blob, to_blob, unique_items
from app.serving.store.vector_index import Neighbor, VectorIndex


class MemoryStore:
    """Process-local, bounded LRU; for tests and for deployments that want no persistence."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._data: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._names: dict[tuple[str, str], str] = {}
        self._index = VectorIndex()
        self._lock = threading.Lock()

    def put_many(self, model: str, items: Sequence[tuple[str, np.ndarray]],
                 filenames: Sequence[str | None] | None = None) -> None:
        batch = unique_items(items, filenames)
        blobs = [to_blob(v) for v in batch.vectors]
        with self._lock:
            # checked first: a refusal leaves the dict and the index as they were
            addition = self._index.prepare(model, batch.ids, batch.vectors, batch.names)
            for image_id, blob, name in zip(batch.ids, blobs, batch.names, strict=True):
                key = (model, image_id)
                self._data.pop(key, None)
                self._data[key] = blob
                if name is not None:
                    self._names[key] = name
            evicted = []
            while len(self._data) > self.max_items:
                key, _ = self._data.popitem(last=False)
                self._names.pop(key, None)
                evicted.append(key)
            self._index.apply(addition, evicted)

    def get_many(self, model: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        with self._lock:
            return {i: from_blob(b) for i in ids if (b := self._data.get((model, i))) is not None}

    def count(self) -> int:
        return len(self._data)

    def ping(self) -> None:
        pass

    def search(self, model: str, query: np.ndarray, k: int,
               exclude: str | None = None) -> list[Neighbor]:
        return self._index.search(model, query, k, exclude)

    def filenames(self, model: str, ids: Sequence[str]) -> dict[str, str | None]:
        with self._lock:
            return {i: self._names.get((model, i)) for i in ids if (model, i) in self._data}

    def close(self) -> None:
        pass
