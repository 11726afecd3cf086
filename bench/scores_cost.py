"""What the unknown scores and calibrated probabilities add to a batch on the inference thread:
the engine's forward pass against ``Scores`` (softmax over T, Mahalanobis, the top label's cell
map), interleaved, one ONNX Runtime thread, OpenBLAS on one thread as ``imgrec serve`` sets it.
Prints figures, asserts nothing.

    OPENBLAS_NUM_THREADS=1 python bench/scores_cost.py --reps 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.serving.predictor import Predictor  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=str(ROOT / "models" / "fashion-mnist"))
    p.add_argument("--reps", type=int, default=40)
    args = p.parse_args()
    pred = Predictor(args.model_dir, device="cpu", threads=1)
    rng = np.random.default_rng(0)
    print(f"# python bench/scores_cost.py {' '.join(sys.argv[1:])}")
    print("| batch | engine ms | scores ms | scores / engine |")
    print("|---|---|---|---|")
    for batch in (1, 32):
        x = rng.integers(0, 256, (batch, *pred.image_shape), dtype=np.uint8)
        engine, scores = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            out = pred.engine(x)
            t1 = time.perf_counter()
            pred.scores(out)
            t2 = time.perf_counter()
            engine.append(t1 - t0)
            scores.append(t2 - t1)
        e, s = statistics.median(engine) * 1e3, statistics.median(scores) * 1e3
        print(f"| {batch} | {e:.2f} | {s:.3f} | {s / e:.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
