"""Nearest-neighbour candidates for the embedding store's similarity index, measured in one run.

For each size n (vectors of `--dim` float32, unit length, clustered like real embeddings) and each
library installed: build time, single-query latency p50/p99 (k=10, one query at a time, as GET
/search asks), and recall@10 against exact search. Libraries that are not installed are skipped
with a line saying so.

    python bench/search_index.py --sizes 10000,100000,200000 --queries 200

Print figures only; the machine may be shared, so compare rows of one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 1,000 centres: neighbours exist, as among a catalogue's photos."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000, q))


def run(name: str, build: Callable[[np.ndarray], Callable[[np.ndarray, int], np.ndarray]],
        x: np.ndarray, queries: np.ndarray, truth: np.ndarray | None, k: int) -> np.ndarray:
    t0 = time.perf_counter()
    search = build(x)
    built = time.perf_counter() - t0
    search(queries[0], k)  # warm
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(search(q, k))
        times.append(time.perf_counter() - t)
    got = np.stack(found)
    recall = 1.0 if truth is None else float(np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(got, truth, strict=True)]))
    print(f"  {name:<28} build {built:7.2f} s   p50 {pct(times, 50):7.2f} ms   "
          f"p99 {pct(times, 99):7.2f} ms   recall@{k} {recall:.3f}", flush=True)
    return got


def numpy_exact(x: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
    def search(q: np.ndarray, k: int) -> np.ndarray:
        s = x @ q
        top = np.argpartition(-s, k)[:k]
        return top[np.argsort(-s[top])]
    return search


def numpy_f16(x: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
    h = x.astype(np.float16)

    def search(q: np.ndarray, k: int) -> np.ndarray:
        s = h @ q.astype(np.float16)
        top = np.argpartition(-s, k)[:k]
        return top[np.argsort(-s[top])]
    return search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,200000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--hnsw-max", type=int, default=10_000,
                    help="build the graph indexes only up to this size (they take minutes)")
    args = ap.parse_args()
    for n in [int(s) for s in args.sizes.split(",")]:
        x = clustered(n, args.dim, 0)
        queries = x[np.random.default_rng(1).integers(0, n, args.queries)] + 0.01
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        print(f"n={n} dim={args.dim} k={args.k} queries={args.queries}")
        truth = run("numpy exact (float32)", numpy_exact, x, queries, None, args.k)
        if n <= args.hnsw_max:  # no BLAS for float16: seconds per query at 100k
            run("numpy exact (float16)", numpy_f16, x, queries, truth, args.k)
        try:
            import faiss

            def faiss_flat(x: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
                index = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
                index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
                return lambda q, k: index.search(q[None], k)[1][0]

            def faiss_hnsw(x: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
                index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = 64
                index.add(x)
                index.hnsw.efSearch = 64
                return lambda q, k: index.search(q[None], k)[1][0]

            def faiss_knn(x: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
                # faiss's exhaustive kernel on a matrix we own (no faiss index to keep in step)
                ip = faiss.METRIC_INNER_PRODUCT
                return lambda q, k: faiss.knn(q[None], x, k, metric=ip)[1][0]

            faiss.omp_set_num_threads(1)
            run("faiss IndexFlatIP (exact)", faiss_flat, x, queries, truth, args.k)
            run("faiss.knn on a matrix (exact)", faiss_knn, x, queries, truth, args.k)
            if n <= args.hnsw_max:
                run("faiss HNSW32 ef64", faiss_hnsw, x, queries, truth, args.k)
        except ImportError:
            print("  faiss-cpu not installed")
        try:
            from usearch.index import Index

            def usearch_exact(x: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
                from usearch.index import search as brute

                return lambda q, k: brute(x, q, k, metric="ip", exact=True).keys

            def usearch_hnsw(x: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
                index = Index(ndim=x.shape[1], metric="ip", dtype="f32")
                index.add(np.arange(len(x)), x)
                return lambda q, k: index.search(q, k).keys

            run("usearch exact", usearch_exact, x, queries, truth, args.k)
            if n <= args.hnsw_max:
                run("usearch HNSW (defaults)", usearch_hnsw, x, queries, truth, args.k)
        except ImportError:
            print("  usearch not installed")
        try:
            import hnswlib

            def hnsw(x: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
                index = hnswlib.Index(space="ip", dim=x.shape[1])
                index.init_index(max_elements=len(x), ef_construction=64, M=16)
                index.add_items(x, np.arange(len(x)))
                index.set_ef(64)
                return lambda q, k: index.knn_query(q, k)[0][0]

            if n <= args.hnsw_max:
                run("hnswlib M16 ef64", hnsw, x, queries, truth, args.k)
        except ImportError:
            print("  hnswlib not installed")


if __name__ == "__main__":
    main()
