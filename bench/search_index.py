"""Approximate nearest-neighbour libraries for the similarity index, on real feature vectors of
the shipped model (bench/vectors.py), one thread each, measured in one run.

For each library and setting: inserts/s per core (CPU time beside wall time), query p50 (k=10,
one query at a time) at the smallest search expansion that reaches recall@10 >= 0.95 against
exact search (held-out vectors as queries, the candidates as the library ranks them, and after
exact re-scoring of the top 4k), bytes per vector of the saved index, whether it deletes, and
the time to load the saved index (read into memory, and memory-mapped where offered).

    OMP_NUM_THREADS=1 nice python bench/search_index.py --n 20000 --queries 200

hnswlib and faiss-cpu are not dependencies of imgrec: install them beside it to compare
(PYTHONPATH=/tmp/ann pip install --target /tmp/ann hnswlib faiss-cpu). Prints figures only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vectors import load

K = 10
EXPANSIONS = (16, 24, 32, 48, 64, 96, 128, 256)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = q @ x.T
    top = np.argpartition(-s, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), 1), 1)


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g[:K]) & set(t)) / K for g, t in zip(got, truth, strict=True)]))


def rescored(x: np.ndarray, q: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """The candidates ranked by the exact cosine, as the index's caller does."""
    out = []
    for qi, c in zip(q, cand, strict=True):
        c = c[c >= 0]
        out.append(c[np.argsort(-(x[c] @ qi), kind="stable")][:K])
    return np.array([np.pad(o, (0, K - len(o)), constant_values=-1) for o in out])


class Lib:
    """build(x) -> handle; query(h, q, n, ef) -> ids (n,); save/load(path); delete(h, ids)."""

    def __init__(self, name: str, build: Callable[[np.ndarray], Any],
                 query: Callable[[Any, np.ndarray, int, int], np.ndarray],
                 save: Callable[[Any, str], None], loads: dict[str, Callable[[str], Any]],
                 delete: Callable[[Any, np.ndarray], None] | None) -> None:
        self.name, self.build, self.query, self.save = name, build, query, save
        self.loads, self.delete = loads, delete


def usearch_lib(dtype: str, m: int, ef_add: int) -> Lib:
    from usearch.index import Index

    def build(x: np.ndarray) -> Any:
        index = Index(ndim=x.shape[1], metric="cos", dtype=dtype, connectivity=m,
                      expansion_add=ef_add)
        index.add(np.arange(len(x)), x, threads=1)
        return index

    def query(h: Any, q: np.ndarray, n: int, ef: int) -> np.ndarray:
        h.expansion_search = ef
        return np.asarray(h.search(q, n, threads=1).keys, np.int64)

    return Lib(f"usearch {dtype} M{m} efc{ef_add}", build, query, lambda h, p: h.save(p),
               {"load": lambda p: Index.restore(p), "view": lambda p: Index.restore(p, view=True)},
               lambda h, ids: h.remove(ids))


def hnswlib_lib(m: int, ef_add: int) -> Lib:
    import hnswlib

    def build(x: np.ndarray) -> Any:
        index = hnswlib.Index(space="cosine", dim=x.shape[1])
        index.init_index(max_elements=len(x), ef_construction=ef_add, M=m,
                         allow_replace_deleted=True)
        index.set_num_threads(1)
        index.add_items(x, np.arange(len(x)))
        return index

    def query(h: Any, q: np.ndarray, n: int, ef: int) -> np.ndarray:
        h.set_ef(max(ef, n))
        return np.asarray(h.knn_query(q, n)[0][0], np.int64)

    def loader(p: str) -> Any:
        index = hnswlib.Index(space="cosine", dim=512)
        index.load_index(p)
        return index

    return Lib(f"hnswlib f32 M{m} efc{ef_add}", build, query, lambda h, p: h.save_index(p),
               {"load": loader}, lambda h, ids: [h.mark_deleted(int(i)) for i in ids])


def faiss_lib(m: int, ef_add: int, sq8: bool) -> Lib:
    import faiss

    faiss.omp_set_num_threads(1)

    def build(x: np.ndarray) -> Any:
        ip = faiss.METRIC_INNER_PRODUCT
        index = faiss.IndexHNSWSQ(x.shape[1], faiss.ScalarQuantizer.QT_8bit, m, ip) if sq8 \
            else faiss.IndexHNSWFlat(x.shape[1], m, ip)
        index.hnsw.efConstruction = ef_add
        if sq8:
            index.train(x)
        index.add(x)
        return index

    def query(h: Any, q: np.ndarray, n: int, ef: int) -> np.ndarray:
        h.hnsw.efSearch = max(ef, n)
        return np.asarray(h.search(q[None], n)[1][0], np.int64)

    return Lib(f"faiss {'sq8' if sq8 else 'f32'} M{m} efc{ef_add}", build, query,
               lambda h, p: faiss.write_index(h, p),
               {"load": faiss.read_index,
                "mmap": lambda p: faiss.read_index(p, faiss.IO_FLAG_MMAP)}, None)


def measure(lib: Lib, x: np.ndarray, q: np.ndarray, truth: np.ndarray, tmp: Path) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    h = lib.build(x)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    path = str(tmp / lib.name.replace(" ", "_"))
    lib.save(h, path)
    size = os.path.getsize(path)
    loads = []
    for how, fn in lib.loads.items():
        t = time.perf_counter()
        fn(path)
        loads.append(f"{how} {1000 * (time.perf_counter() - t):.0f} ms")
    rows = []
    for rescore in (False, True):
        for ef in EXPANSIONS:
            n = 4 * K if rescore else K
            times, got = [], []
            for qi in q:
                t = time.perf_counter()
                got.append(lib.query(h, qi, n, ef))
                times.append(time.perf_counter() - t)
            cand = np.array(got)
            r = recall(rescored(x, q, cand) if rescore else cand, truth)
            if r >= 0.95 or ef == EXPANSIONS[-1]:
                rows.append(f"{'4k re-scored' if rescore else 'k as ranked'}: ef {ef} recall "
                            f"{r:.3f} p50 {1000 * np.median(times):.2f} ms")
                break
    deletes = "no"
    if lib.delete is not None:
        lib.delete(h, np.arange(0, len(x), 10))
        left = np.concatenate([lib.query(h, qi, K, 64) for qi in q[:20]])
        deletes = "yes" if not np.any(left[left >= 0] % 10 == 0) else "BROKEN"
    print(f"{lib.name:<26} insert {len(x) / cpu:6.0f}/s per CPU-s (wall {wall:5.1f} s, CPU "
          f"{cpu:5.1f} s)  {size / len(x):5.0f} B/vector  deletes {deletes}  "
          f"{'; '.join(loads)}\n    " + "   ".join(rows), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--only", default="", help="comma list of name prefixes to run")
    args = ap.parse_args()
    allx = unit(load(args.n + args.queries))
    x, q = np.ascontiguousarray(allx[:args.n]), np.ascontiguousarray(allx[args.n:])
    truth = exact(x, q, K)
    print(f"n={args.n} real 512-d vectors of the shipped model, {args.queries} held-out queries,"
          f" k={K}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    libs: list[Callable[[], Lib]] = [
        lambda: usearch_lib("f32", 16, 128), lambda: usearch_lib("f16", 16, 128),
        lambda: usearch_lib("f16", 16, 64), lambda: usearch_lib("i8", 16, 64),
        lambda: usearch_lib("i8", 8, 64),
        lambda: hnswlib_lib(16, 64), lambda: faiss_lib(16, 64, False),
        lambda: faiss_lib(16, 64, True)]
    with tempfile.TemporaryDirectory() as tmp:
        for make in libs:
            try:
                lib = make()
            except ImportError as e:
                print(f"  skipped: {e}")
                continue
            if args.only and not any(lib.name.startswith(p) for p in args.only.split(",")):
                continue
            measure(lib, x, q, truth, Path(tmp))


if __name__ == "__main__":
    main()
