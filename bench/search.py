"""Similar-image search at scale: prints figures, asserts nothing.

Real 512-d feature vectors of the shipped model (bench/vectors.py: Fashion-MNIST and augmented
variants, cached in ~/.cache/imgrec-bench), written through the SQLite store's own API.

1. For each size n (default 10k, 100k, 1M stored vectors; the store filled up to n, the index
   caught up by the store's own background indexer and saved at close): `imgrec serve` on it;
   restart to ready (spawn -> /readyz 200, the snapshot loaded, not rebuilt: its log line is
   checked), GET /search?id=&k=10 through HTTP one at a time (p50, p99), recall@10 of those
   answers against exact kNN (numpy, float32) over the same vectors, the server's RSS, and the
   index's and the SQLite file's bytes per vector.
2. --ab N: POST /predict at concurrency 64 (wrk, as bench/serve.py) on two servers over copies
   of an N-vector store at its bound (every batch evicts), the index on and off
   (IMGREC_EMBED_STORE_ANN_INDEX=false), alternating in one run.
3. --redis N: RediSearch's HNSW index (a search-capable Redis as the tests start it) filled
   with N vectors through RedisStore; GET /search through `imgrec serve` on it: p50, p99,
   recall@10 against exact.

    nice python bench/search.py --sizes 10000,100000,1000000 --ab 100000 --redis 100000

The machine may be shared: its load is printed beside each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from serve import free_port, make_bodies, wrk  # noqa: E402
from vectors import load  # noqa: E402

from app.serving.store import SQLiteStore  # noqa: E402

MODEL_DIR = ROOT / "models" / "fashion-mnist"


def load_avg() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def ids_of(lo: int, hi: int) -> list[str]:
    return [f"{i:064x}" for i in range(lo, hi)]


def fill(path: Path, model: str, x: np.ndarray, lo: int, hi: int, bound: int) -> float:
    """Rows lo..hi through put_many (5,000 a call), the index caught up; returns the seconds
    the indexer took after the last write."""
    store = SQLiteStore(path, bound)
    try:
        for a in range(lo, hi, 5000):
            b = min(hi, a + 5000)
            store.put_many(model, list(zip(ids_of(a, b), x[a:b], strict=True)),
                           [f"item/{i}.png" for i in range(a, b)])
        t = time.perf_counter()
        while not store.wait_indexed(60):
            print(f"    indexing... {len(store.index or ())} ({load_avg()})", flush=True)
        return time.perf_counter() - t
    finally:
        store.close()


def build_index(path: Path, model: str, x: np.ndarray, n: int, threads: int) -> str:
    """Fill the store with rows 0..n with its index off, then build the index here on
    ``threads`` threads (the server's indexer uses one, at nice +10) and save it as the store's
    snapshot, which the server then loads."""
    from app.serving.store.ann_index import AnnIndex

    store = SQLiteStore(path, n, ann=False)
    t = time.perf_counter()
    for a in range(0, n, 5000):
        b = min(n, a + 5000)
        store.put_many(model, list(zip(ids_of(a, b), x[a:b], strict=True)),
                       [f"item/{i}.png" for i in range(a, b)])
    filled = time.perf_counter() - t
    generation = int(store._db.execute("SELECT value FROM meta WHERE name = 'generation'")
                     .fetchone()[0])
    store.close()
    index = AnnIndex()
    wall, cpu = time.perf_counter(), time.process_time()
    for a in range(0, n, 50_000):  # seq = row number + 1: filled in order into a new file
        b = min(n, a + 50_000)
        index.add(model, np.arange(a + 1, b + 1), np.ascontiguousarray(x[a:b], np.float32),
                  threads=threads)
        print(f"    indexed {b:,} ({load_avg()})", flush=True)
    index.watermark = n
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    index.save(Path(str(path) + ".ann"), generation)
    return (f"filled in {filled:.0f} s; index built on {threads} threads in {wall:.0f} s wall, "
            f"{cpu:.0f} s CPU ({n / cpu:,.0f} inserts per CPU-second)")


def serve(store: str, log: Path, extra: dict[str, str] | None = None
          ) -> tuple[subprocess.Popen[bytes], int, float]:
    """imgrec serve on the store; returns (process, port, seconds from spawn to ready)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMGREC_MODEL_DIR": str(MODEL_DIR),
           "IMGREC_PORT": str(port), "IMGREC_DEVICE": "cpu", "IMGREC_LOG_LEVEL": "info",
           "IMGREC_EMBED_STORE": store, "IMGREC_GRPC_PORT": "0", **(extra or {})}
    started = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "imgrec"), "serve"], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, port, time.perf_counter() - started
        except (urllib.error.URLError, OSError):
            pass
        if time.perf_counter() - started > 600:
            raise RuntimeError("server never became ready")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(120)


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


def searches(port: int, ids: list[int], k: int = 10) -> tuple[list[float], list[list[int]]]:
    times, found = [], []
    for i in ids:
        t = time.perf_counter()
        with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/search?id={i:064x}&k={k}", timeout=60) as r:
            body = json.loads(r.read())
        times.append(time.perf_counter() - t)
        found.append([int(n["id"], 16) for n in body["results"][0]["neighbors"]])
    return times, found


def exact_knn(x: np.ndarray, queries: list[int], k: int = 10) -> list[set[int]]:
    """Exact cosine kNN of stored rows (excluding each query itself), in float32 chunks."""
    q = x[queries].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best_s = np.full((len(q), k + 1), -np.inf, np.float32)
    best_i = np.zeros((len(q), k + 1), np.int64)
    for lo in range(0, len(x), 100_000):
        c = np.asarray(x[lo:lo + 100_000], np.float32)
        s = q @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
        s_all = np.concatenate([best_s, s], 1)
        i_all = np.concatenate([best_i, np.arange(lo, lo + len(c))[None].repeat(len(q), 0)], 1)
        top = np.argpartition(-s_all, k, axis=1)[:, :k + 1]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    return [set(row[row != qi][np.argsort(-s[row != qi])][:k].tolist())
            for row, s, qi in zip(best_i, best_s, queries, strict=True)]


def recall(found: list[list[int]], truth: list[set[int]]) -> float:
    return float(np.mean([len(set(f) & t) / 10 for f, t in zip(found, truth, strict=True)]))


def report_size(db: Path, n: int, x: np.ndarray, queries: int, tmp: Path) -> None:
    log = tmp / f"serve-{n}.log"
    t = time.perf_counter()
    store = SQLiteStore(db, n)  # what a restart's store open costs: the snapshot checked, read
    opened = time.perf_counter() - t
    store.close()
    proc, port, ready_s = serve(str(db), log)
    try:
        loaded = "loaded the search index snapshot" in log.read_text()
        qids = np.random.default_rng(n).choice(n, queries + 5, replace=False).tolist()
        times, found = searches(port, qids)
        ms = np.asarray(times[5:]) * 1000
        truth = exact_knn(x[:n], qids[5:])
        r = recall(found[5:], truth)
        rss = rss_mb(proc.pid)
    finally:
        stop(proc)
    ann = sum(f.stat().st_size for f in Path(str(db) + ".ann").glob("*.usearch"))
    disk = sum(f.stat().st_size for f in db.parent.glob(db.name + "*") if f.is_file())
    print(f"n={n:>9,}  restart to ready {ready_s:5.2f} s (store open {opened:4.2f} s, snapshot "
          f"{'loaded' if loaded else 'NOT loaded'})   GET /search k=10 p50 "
          f"{np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms   "
          f"recall@10 {r:.3f}   server RSS {rss:6.0f} MB   index {ann / n:4.0f} B/vector, "
          f"SQLite {(disk - ann) / n:5.0f} B/vector ({disk / 1e9:.2f} GB in all)   "
          f"{load_avg()}", flush=True)


def predict_ab(db: Path, n: int, tmp: Path, rounds: int, seconds: float) -> None:
    bodies = tmp / "bodies"
    make_bodies(bodies, 500, "png28")
    servers = {}
    for label, on in (("index off", "false"), ("index on", "true")):
        copy = tmp / f"ab-{on}.sqlite3"
        shutil.copy(db, copy)
        if on == "true":
            shutil.copytree(Path(str(db) + ".ann"), Path(str(copy) + ".ann"))
        extra = {"IMGREC_EMBED_STORE_ANN_INDEX": on, "IMGREC_EMBED_STORE_MAX_ITEMS": str(n),
                 "IMGREC_LOG_LEVEL": "warning"}
        servers[label] = serve(str(copy), tmp / f"ab-{on}.log", extra)[:2]
    try:
        rps: dict[str, list[float]] = {k: [] for k in servers}
        for _ in range(rounds):
            for label, (proc, port) in servers.items():
                run = wrk(port, 64, seconds, bodies, 500, proc.pid, label)
                rps[label].append(run.rps)
                print(f"  {label:<10} c=64 {run.rps:7.0f} req/s  p50 {run.p50_ms:6.1f} ms  p99 "
                      f"{run.p99_ms:6.1f} ms  server CPU {run.cpu_ms_per_req:.2f} ms/req  "
                      f"errors {run.errors}  {load_avg()}", flush=True)
        on, off = (float(np.median(rps[k])) for k in ("index on", "index off"))
        print(f"/predict c=64, store of {n:,} at its bound: index on / off = {on / off:.3f} "
              f"(medians of {rounds})", flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)


def redis_case(n: int, x: np.ndarray, model: str, queries: int, tmp: Path) -> None:
    from helpers.daemons import start_redis

    from app.serving.store.redis_store import RedisStore

    daemon, url = start_redis(tmp / "redis", search=True, timeout_s=60)
    try:
        store = RedisStore(url, n, timeout_s=300)  # RediSearch indexes inside each write
        t = time.perf_counter()
        for a in range(0, n, 500):
            b = min(n, a + 500)
            store.put_many(model, list(zip(ids_of(a, b), x[a:b], strict=True)))
        print(f"  RediSearch HNSW: {n:,} vectors written and indexed in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        store.close()
        proc, port, _ = serve(url, tmp / "serve-redis.log")
        try:
            qids = np.random.default_rng(1).choice(n, queries + 5, replace=False).tolist()
            times, found = searches(port, qids)
        finally:
            stop(proc)
        ms = np.asarray(times[5:]) * 1000
        r = recall(found[5:], exact_knn(x[:n], qids[5:]))
        print(f"RediSearch HNSW n={n:,}: GET /search k=10 p50 {np.percentile(ms, 50):6.2f} ms  "
              f"p99 {np.percentile(ms, 99):6.2f} ms  recall@10 {r:.3f}  {load_avg()}",
              flush=True)
    finally:
        daemon.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--ab", type=int, default=0, help="store size for the /predict A/B")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--redis", type=int, default=0, help="vectors for the RediSearch case")
    p.add_argument("--tmp", type=Path, default=None)
    p.add_argument("--build-threads", type=int, default=0,
                   help="build each size's index in this process on N threads (a fresh store "
                        "each), instead of the server's own indexer")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    model = json.loads((MODEL_DIR / "card.json").read_text())["weights_sha256"]
    x = load(max([*sizes, args.ab, args.redis]))
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="bench-search-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"{len(x):,} real vectors of the shipped model; {os.cpu_count()} cores; {load_avg()};"
          f" files in {tmp}", flush=True)
    db, have = tmp / "emb.sqlite3", 0
    for n in sizes:
        if args.build_threads:
            big = tmp / f"emb-{n}.sqlite3"
            print("  " + build_index(big, model, x, n, args.build_threads), flush=True)
            report_size(big, n, x, args.queries, tmp)
            continue
        t = time.perf_counter()
        caught = fill(db, model, x, have, n, max(sizes))
        print(f"  filled {have:,}..{n:,} in {time.perf_counter() - t:.0f} s (the indexer "
              f"finished {caught:.0f} s after the last write)", flush=True)
        have = n
        report_size(db, n, x, args.queries, tmp)
        if n == args.ab:
            predict_ab(db, n, tmp, args.rounds, args.seconds)
    if args.redis:
        redis_case(args.redis, x, model, args.queries, tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
