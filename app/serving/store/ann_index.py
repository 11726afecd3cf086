"""The approximate similarity index beside the SQLite store: one HNSW graph (usearch) per store
key, keyed by the rows' SQLite ``seq``, proposing candidates that the store re-scores exactly.

usearch was chosen by measurement on real vectors of the shipped model (BENCHMARKS.md,
bench/search_index.py): it deletes (evictions leave the graph; faiss's HNSW cannot), saves,
loads a saved graph quickly (memory-maps one in milliseconds), safe for one writer beside many
readers, and stores int8 components. The parameters below are the measured trade: int8 with
connectivity 16 takes ~660 bytes per 512-d vector on disk (float32: 2,200) and inserts at
~11,000 vectors per CPU-second at 20k (about 3x float16's); its own ranking of int8
components is poor (recall@10 ~0.92), but the store re-scores 4k candidates against the float32
vectors it holds, which gave 0.99+ at 20k and 1M (bench/search.py).

Only the indexer thread (ann_indexer.py) adds and removes; searches come from any thread. A
graph only grows inside ``add`` (usearch reserves there), which must not run beside a search:
such adds, and removals, take the part's lock, which searches also take for their (short) call.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.serving.store import ann_snapshot as snap


@dataclass(frozen=True, slots=True)
class AnnParams:
    dtype: str = "i8"
    connectivity: int = 16
    expansion_add: int = 64
    expansion_search: int = 64
    candidates_per_k: int = 4  # the index proposes this many per neighbour asked for
    min_candidates: int = 40

    def snapshot_key(self) -> dict[str, Any]:
        """What a saved graph depends on (search-time settings may change freely)."""
        d = asdict(self)
        return {k: d[k] for k in ("dtype", "connectivity", "expansion_add")}


class _Part:
    def __init__(self, index: Any, dim: int) -> None:
        self.index = index
        self.dim = dim
        self.lock = threading.Lock()
        self.dirty = True  # changed since the snapshot that holds it
        self.file: snap.Part | None = None


def _new_index(dim: int, p: AnnParams) -> Any:
    from usearch.index import Index

    return Index(ndim=dim, metric="cos", dtype=p.dtype, connectivity=p.connectivity,
                 expansion_add=p.expansion_add, expansion_search=p.expansion_search)


class AnnIndex:
    def __init__(self, params: AnnParams | None = None) -> None:
        self.params = params or AnnParams()
        self._parts: dict[str, _Part] = {}
        self._lock = threading.Lock()  # the parts dict
        # every row with seq <= watermark is in its part (or was deleted since)
        self.watermark = 0

    # -- reading (any thread) --------------------------------------------------------------
    def candidates(self, model: str, query: np.ndarray, n: int) -> np.ndarray:
        """Up to max(n x candidates_per_k, min_candidates) seqs near the unit query."""
        with self._lock:
            part = self._parts.get(model)
        if part is None or part.dim != query.shape[0] or len(part.index) == 0:
            return np.empty(0, np.int64)
        want = max(n * self.params.candidates_per_k, self.params.min_candidates)
        with part.lock:
            found = part.index.search(query, want, threads=1)
        return np.asarray(found.keys, np.int64)

    def dim(self, model: str) -> int | None:
        with self._lock:
            part = self._parts.get(model)
        return part.dim if part is not None else None

    def __len__(self) -> int:
        with self._lock:
            return sum(len(p.index) for p in self._parts.values())

    def keys(self, model: str) -> np.ndarray:
        with self._lock:
            part = self._parts.get(model)
        return np.asarray(part.index.keys[:], np.int64) if part is not None else \
            np.empty(0, np.int64)

    def models(self) -> list[str]:
        with self._lock:
            return list(self._parts)

    # -- writing (the indexer thread only) ----------------------------------------------------
    def add(self, model: str, seqs: np.ndarray, vectors: np.ndarray, threads: int = 1) -> None:
        with self._lock:
            part = self._parts.get(model)
            if part is None:
                part = self._parts[model] = _Part(_new_index(vectors.shape[1], self.params),
                                                  vectors.shape[1])
        index = part.index
        keys = np.asarray(seqs, np.uint64)
        if len(index) + len(keys) > index.capacity:  # it grows: no search beside it
            with part.lock:
                index.add(keys, vectors, threads=threads)
        else:
            index.add(keys, vectors, threads=threads)
        part.dirty = True

    def remove(self, model: str, seqs: list[int] | np.ndarray) -> None:
        with self._lock:
            part = self._parts.get(model)
        if part is None or not len(seqs):
            return
        with part.lock:
            if part.index.remove(np.asarray(seqs, np.uint64)):
                part.dirty = True

    def clear(self) -> None:
        with self._lock:
            self._parts = {}
            self.watermark = 0

    # -- the snapshot ------------------------------------------------------------------------
    def save(self, folder: Path, generation: int) -> None:
        """The parts changed since the last save to new files, then the manifest."""
        folder.mkdir(parents=True, exist_ok=True)
        watermark = self.watermark
        parts: dict[str, snap.Part] = {}
        for n, model in enumerate(sorted(self.models())):
            with self._lock:
                part = self._parts[model]
            if part.dirty or part.file is None:
                path = snap.part_file(folder, watermark, n)
                part.dirty = False  # before the save: a change during it marks it again
                try:
                    part.index.save(str(path))
                    part.file = snap.finish_part(path, part.dim, len(part.index))
                except BaseException:
                    part.dirty = True  # saved again next time, never an older file named
                    raise
            parts[model] = part.file
        snap.write_manifest(folder, snap.Manifest(generation, watermark,
                                                  self.params.snapshot_key(), parts))

    def load(self, folder: Path, generation: int) -> None:
        """The snapshot's parts, read into memory; SnapshotInvalid, changing nothing, when it
        cannot be used. usearch holds the GIL while it reads a graph (~0.4 s per 100k vectors
        here), so this runs while the store opens, before the service is ready, never beside
        requests (a memory-mapped view would open in milliseconds, but is read-only)."""
        from usearch.index import Index

        manifest = snap.read_manifest(folder, generation, self.params.snapshot_key())
        parts: dict[str, _Part] = {}
        for model, info in manifest.parts.items():
            path = folder / info.file
            index = Index.restore(str(path), view=False)
            if index is None or index.ndim != info.dim or len(index) != info.count:
                raise snap.SnapshotInvalid(f"corrupt snapshot: {info.file} holds "
                                           f"{0 if index is None else len(index)} vectors, "
                                           f"the manifest says {info.count}")
            index.expansion_search = self.params.expansion_search  # type: ignore[misc]
            part = parts[model] = _Part(index, info.dim)
            part.dirty, part.file = False, info
        with self._lock:
            self._parts = parts
            self.watermark = manifest.watermark
