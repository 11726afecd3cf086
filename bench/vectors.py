"""Real feature vectors of the shipped model, for the search benchmarks: Fashion-MNIST (the
Debian package's 70,000 images) embedded with the CPU engine (ONNX Runtime), then as many
augmented variants as asked for (shift, crop-and-rescale, flip, small rotation, brightness),
each one embedded by the same graph. Computed once and cached as .npy outside the repository.

    nice python bench/vectors.py --n 1000000   # ~/.cache/imgrec-bench/fashion-<sha>-1000000.npy

``load(n)`` returns the first n rows (float32, (n, 512)), computing what the cache lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("IMGREC_BENCH_CACHE", Path.home() / ".cache" / "imgrec-bench"))
MODEL_DIR = ROOT / "models" / "fashion-mnist"


def fashion_images() -> np.ndarray:
    """The 70,000 Fashion-MNIST images (train then test), uint8 (N, 28, 28)."""
    from app.training.data import _idx_file, find_fashion_mnist, read_idx

    root = find_fashion_mnist()
    return np.concatenate([read_idx(_idx_file(root, "train-images-idx3-ubyte")),
                           read_idx(_idx_file(root, "t10k-images-idx3-ubyte"))])


def augment(images: np.ndarray, seed: int) -> np.ndarray:
    """One random variant of each image: an affine warp (rotation within +-15 degrees, scale
    0.8-1.15 as a crop or a zoom out, shift within 3 px, horizontal flip half the time),
    bilinear, then brightness x0.7-1.3. Vectorised over the batch."""
    rng = np.random.default_rng(seed)
    n, size = len(images), images.shape[1]
    theta = np.deg2rad(rng.uniform(-15, 15, n))
    scale = rng.uniform(0.8, 1.15, n)
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    shift = rng.uniform(-3, 3, (n, 2))
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - c
    cos, sin = (np.cos(theta) / scale)[:, None, None], (np.sin(theta) / scale)[:, None, None]
    # inverse map: output pixel -> input coordinates
    sx = flip[:, None, None] * (cos * xx + sin * yy) + c - shift[:, 0, None, None]
    sy = -sin * xx + cos * yy + c - shift[:, 1, None, None]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = sx - x0, sy - y0
    img = images.astype(np.float32)
    out = np.zeros((n, size, size), np.float32)
    b = np.arange(n)[:, None, None]
    for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)),
                      (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        out += w * np.where(ok, img[b, yi.clip(0, size - 1), xi.clip(0, size - 1)], 0)
    out *= rng.uniform(0.7, 1.3, n)[:, None, None]
    return out.clip(0, 255).round().astype(np.uint8)


def embed(images: np.ndarray, threads: int, batch: int = 512) -> np.ndarray:
    from app.serving.engines import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(MODEL_DIR / "model.onnx", threads)
    out = np.empty((len(images), 512), np.float32)
    for lo in range(0, len(images), batch):
        out[lo:lo + batch] = engine(images[lo:lo + batch, None])[1]
    return out


def cache_path(n: int) -> Path:
    sha = json.loads((MODEL_DIR / "card.json").read_text())["weights_sha256"][:12]
    return CACHE / f"fashion-{sha}-{n}.npy"


def load(n: int, threads: int = 2, verbose: bool = True) -> np.ndarray:
    """The first n vectors: from the smallest cached file that holds n, else computed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sha = cache_path(n).name.split("-")[1]
    have = sorted((int(p.stem.rsplit("-", 1)[1]), p) for p in CACHE.glob(f"fashion-{sha}-*.npy"))
    for size, path in have:
        if size >= n:
            return np.load(path, mmap_mode="r")[:n]
    base = fashion_images()
    # rows are a pure function of their position (round r = augment(base, seed=r)): extend the
    # largest cached file's whole rounds instead of starting again
    done = (have[-1][0] // len(base)) * len(base) if have else 0
    chunks = [np.load(have[-1][1], mmap_mode="r")[:done]] if done else []
    started = time.perf_counter()
    while done < n:
        take = min(len(base), n - done)
        round_ = done // len(base)  # round 0: the images as they are
        images = base[:take] if round_ == 0 else augment(base[:take], seed=round_)
        chunks.append(embed(images, threads))
        done += take
        if verbose:
            print(f"  embedded {done:,}/{n:,} ({done / (time.perf_counter() - started):,.0f}"
                  " img/s)", file=sys.stderr, flush=True)
    vectors = np.concatenate(chunks)
    tmp = cache_path(n).with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.rename(cache_path(n))
    return vectors


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    t = time.perf_counter()
    x = load(args.n, args.threads)
    print(f"{len(x):,} vectors of {x.shape[1]} in {cache_path(args.n).parent} "
          f"({time.perf_counter() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
