"""Similar-image search benchmark: prints figures, asserts nothing.

1. The SQLite store with n stored 512-d vectors (n = 10k, 100k, 200k = the default bound):
   the time to open it (which rebuilds the exact index from the table), then `imgrec serve`
   on it and GET /search?id=...&k=10 one at a time: p50 and p99.
2. The cost of keeping the index current: POST /predict at concurrency 64 (wrk, as
   bench/serve.py), store full at its bound so that every batch also evicts, against the
   code without the index (--baseline-tree, e.g. a checkout of the commit before it), A/B
   alternating in one run.
3. `imgrec index DIR` on generated 28x28 PNGs: images/s.

    python bench/search.py --baseline-tree /path/to/checkout-without-search

The machine may be shared: compare figures of one run, as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from serve import free_port, make_bodies, wait_ready, wrk  # noqa: E402

from app.serving.store import SQLiteStore  # noqa: E402


def fill(path: Path, model: str, n: int, dim: int, start: int = 0) -> list[str]:
    rng = np.random.default_rng(start)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    store = SQLiteStore(path, 200_000)
    ids = []
    try:
        for lo in range(start, n, 5000):
            hi = min(n, lo + 5000)
            x = centres[rng.integers(0, 1000, hi - lo)] + \
                0.6 * rng.standard_normal((hi - lo, dim)).astype(np.float32)
            chunk = [f"{i:064x}" for i in range(lo, hi)]
            store.put_many(model, list(zip(chunk, x, strict=True)),
                           [f"item/{i}.png" for i in range(lo, hi)])
            ids += chunk
    finally:
        store.close()
    return ids


def serve(model_dir: Path, store: Path, tree: Path, extra: dict[str, str] | None = None
          ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree), "IMGREC_MODEL_DIR": str(model_dir),
           "IMGREC_PORT": str(port), "IMGREC_DEVICE": "cpu", "IMGREC_LOG_LEVEL": "warning",
           "IMGREC_EMBED_STORE": str(store), **(extra or {})}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "imgrec"), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree)
    wait_ready(port, proc, timeout_s=300)
    return proc, port


def search_latency(port: int, ids: list[str], queries: int) -> tuple[float, float]:
    rng = np.random.default_rng(7)
    times = []
    for i in rng.choice(len(ids), queries + 3):
        t = time.perf_counter()
        with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/search?id={ids[i]}&k=10", timeout=30) as r:
            r.read()
        times.append(time.perf_counter() - t)
    ms = np.asarray(times[3:]) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "fashion-mnist")
    p.add_argument("--sizes", default="10000,100000,200000")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--baseline-tree", type=Path, default=None)
    p.add_argument("--seconds", type=float, default=8.0, help="per wrk run")
    p.add_argument("--rounds", type=int, default=2, help="A/B pairs")
    p.add_argument("--index-images", type=int, default=2000)
    args = p.parse_args()
    card = json.loads((args.model_dir / "card.json").read_text())
    model, dim = card["weights_sha256"], card["embedding_dim"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    print(f"model {card['name']} ({dim}-d vectors); {os.cpu_count()} cores, shared", flush=True)

    # 1. search latency by store size
    db = tmp / "emb.sqlite3"
    ids: list[str] = []
    for n in [int(s) for s in args.sizes.split(",")]:
        ids += fill(db, model, n, dim, start=len(ids))
        t = time.perf_counter()
        SQLiteStore(db, 200_000).close()
        opened = time.perf_counter() - t
        proc, port = serve(args.model_dir, db, ROOT)
        try:
            p50, p99 = search_latency(port, ids, args.queries)
        finally:
            proc.terminate()
            proc.wait(60)
        print(f"n={n:>7}  open+rebuild {opened:6.2f} s   GET /search k=10: p50 {p50:7.1f} ms"
              f"   p99 {p99:7.1f} ms", flush=True)

    # 2. /predict at concurrency 64, store at its bound, with and without the index
    if args.baseline_tree is not None:
        bodies = tmp / "bodies"
        make_bodies(bodies, 500, "png28")
        servers = {}
        for label, tree in (("without index", args.baseline_tree), ("with index", ROOT)):
            copy = tmp / f"ab-{label.replace(' ', '-')}.sqlite3"
            copy.write_bytes(db.read_bytes())
            servers[label] = serve(args.model_dir, copy, tree)
        try:
            rps: dict[str, list[float]] = {k: [] for k in servers}
            for _ in range(args.rounds):
                for label, (proc, port) in servers.items():
                    run = wrk(port, 64, args.seconds, bodies, 500, proc.pid, label)
                    rps[label].append(run.rps)
                    print(f"  {label:<14} c=64  {run.rps:7.0f} req/s  p50 {run.p50_ms:6.1f} ms"
                          f"  p99 {run.p99_ms:6.1f} ms  errors {run.errors}", flush=True)
            a, b = (float(np.median(rps[k])) for k in ("without index", "with index"))
            print(f"/predict c=64 with the index / without: {b / a:.3f} (median of "
                  f"{args.rounds})", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(60)

    # 3. imgrec index throughput
    from PIL import Image

    images = tmp / "catalogue"
    rng = np.random.default_rng(3)
    for i in range(args.index_images):
        d = images / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), np.uint8), mode="L").save(d / f"{i}.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMGREC_DEVICE": "cpu",
           "IMGREC_EMBED_STORE": str(tmp / "index.sqlite3")}
    out = subprocess.run([str(Path(sys.executable).parent / "imgrec"), "index", str(images),
                          "--model-dir", str(args.model_dir), "--no-progress"], env=env,
                         capture_output=True, text=True, check=True)
    print("imgrec index:", out.stderr.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
