"""A/B of two source trees in one run: the same server, load and machine, interleaved.

Each tree is served by `imgrec serve` from that tree (PYTHONPATH and cwd set to it, this
interpreter and its packages for both), one at a time, in alternating rounds (A B A B ...), so
that whatever else the machine does falls on both alike. Each round runs wrk at each
concurrency over the same distinct PNG uploads (bench/serve.py's bodies and wrk runner).
Prints the median of the rounds per tree and concurrency, and the ratio of each to the first.
Asserts nothing. Each tree serves its own models/fashion-mnist unless --model-dir names one
(a tree's code and its shipped model directory go together); ``--query NAME=explain=true``
adds a query string to that tree's /predict and ``--env NAME=VAR=VALUE`` a variable to its
server's environment (the same tree may be given twice, named apart).

    git worktree add /tmp/previous <commit>
    python bench/ab_trees.py --tree previous=/tmp/previous --tree new=. --rounds 3
    python bench/ab_trees.py --tree main=/tmp/main --tree scores=. --tree explain=. \
        --query explain=explain=true
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import MALLOC, Run, free_port, make_bodies, wait_ready, wrk  # noqa: E402


def serve(tree: Path, model_dir: Path, tmp: Path, extra: dict[str, str] | None = None
          ) -> tuple[subprocess.Popen[bytes], int]:
    """`imgrec serve` from ``tree`` on a free port, ready; no OTEL_* of this shell's (tracing
    stays off unless ``extra`` turns it on)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({**MALLOC, "PYTHONPATH": str(tree), "IMGREC_MODEL_DIR": str(model_dir),
                "IMGREC_PORT": str(port), "IMGREC_DEVICE": "cpu",
                "IMGREC_LOG_LEVEL": "warning", "IMGREC_GRPC_PORT": "0",
                "IMGREC_EMBED_STORE": str(tmp / f"emb-{port}.sqlite3"), **(extra or {})})
    cmd = [sys.executable, "-c", "from app.cli import main; raise SystemExit(main())", "serve"]
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_ready(port, proc)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                   help="two or more: the first is the reference")
    p.add_argument("--model-dir", default=None, help="default: each tree's own "
                   "models/fashion-mnist")
    p.add_argument("--query", action="append", default=[], metavar="NAME=QUERY",
                   help="query string of that tree's /predict")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VAR=VALUE",
                   help="an environment variable of that tree's server")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0, help="per wrk run")
    p.add_argument("--concurrency", default="1,64")
    args = p.parse_args()
    trees = [(name, Path(path).resolve()) for name, path in
             (t.split("=", 1) for t in args.tree)]
    levels = [int(c) for c in args.concurrency.split(",")]
    queries = dict(q.split("=", 1) for q in args.query)
    envs: dict[str, dict[str, str]] = {}
    for item in args.env:
        name, var, value = item.split("=", 2)
        envs.setdefault(name, {})[var] = value
    runs: dict[tuple[str, int], list[Run]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bodies = tmp / "bodies"
        count = 256
        make_bodies(bodies, count, "png")
        for _ in range(args.rounds):
            for name, tree in trees:
                model = Path(args.model_dir) if args.model_dir else tree / "models/fashion-mnist"
                path = "/predict" + (f"?{queries[name]}" if name in queries else "")
                proc, port = serve(tree, model, tmp, envs.get(name))
                try:
                    wrk(port, 16, 2, bodies, count, proc.pid, name, path)  # warm
                    for c in levels:
                        runs.setdefault((name, c), []).append(
                            wrk(port, c, args.seconds, bodies, count, proc.pid, name, path))
                finally:
                    stop(proc)
    print(f"# python bench/ab_trees.py {' '.join(sys.argv[1:])}")
    print(f"# medians of {args.rounds} interleaved rounds, {args.seconds:g} s per wrk run")
    print("| tree | conc. | req/s | p50 ms | p99 ms | server CPU ms/req | errors |")
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        for name, _ in trees:
            rs = runs[(name, c)]
            print(f"| {name} | {c} | {statistics.median(r.rps for r in rs):.0f} | "
                  f"{statistics.median(r.p50_ms for r in rs):.2f} | "
                  f"{statistics.median(r.p99_ms for r in rs):.2f} | "
                  f"{statistics.median(r.cpu_ms_per_req for r in rs):.2f} | "
                  f"{sum(r.errors for r in rs)} |")
        a = statistics.median(r.rps for r in runs[(trees[0][0], c)])
        for name, _ in trees[1:]:
            b = statistics.median(r.rps for r in runs[(name, c)])
            print(f"| {name} / {trees[0][0]} | {c} | {b / a:.3f} | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
