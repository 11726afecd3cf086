"""`imgrec index` on one machine against `imgrec index --ray`: prints figures, asserts nothing.

The same N images (Fashion-MNIST test then train garments as 28x28 PNGs, in class folders,
made once into --dir), a fresh SQLite store per run, the shipped model on ONNX Runtime:

1. per-image CPU of each stage in this process (read+sha256, prepare, forward at the batch
   size, the store write), the floor under both indexers;
2. rounds of: the single-process indexer (a subprocess; its CPU from wait4), the Ray
   pipeline with read+decode fused into the embedding actors (the default on CPUs), and with
   decode in tasks of its own (``decode_tasks``, what GPU clusters get). The Ray runs start a
   local Ray of `--cpus` CPUs in this process, and their CPU is user+system time of every
   process under this one (driver, raylet, GCS, workers, writer) over the run, grouped by role.

    python bench/bulk_index.py --images 20000 --rounds 2

The machine may be shared: `uptime` is printed before each run; compare rows of one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TICK = os.sysconf("SC_CLK_TCK")
ROWS = 256  # app.serving.ray_index.pipeline.ROWS_PER_BATCH


def make_images(folder: Path, n: int) -> Path:
    """n distinct PNGs: the test garments first, then the training ones, in label folders."""
    import numpy as np
    from PIL import Image

    from app.training.data import _idx_file, find_fashion_mnist, read_idx

    done = folder / f".complete-{n}"
    if done.exists():
        return folder
    root = find_fashion_mnist()
    images = np.concatenate([read_idx(_idx_file(root, f"{s}-images-idx3-ubyte"))
                             for s in ("t10k", "train")])[:n]
    labels = np.concatenate([read_idx(_idx_file(root, f"{s}-labels-idx1-ubyte"))
                             for s in ("t10k", "train")])[:n]
    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        path = folder / str(int(y)) / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
    done.touch()
    return folder


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def stage_costs(folder: Path, batch: int, redis_url: str | None, n: int = 2000
                ) -> dict[str, float]:
    """CPU ms per image of each step, in this process, one thread; the store writes in the
    pipeline's batches (ROWS_PER_BATCH)."""
    import hashlib

    from app.serving.bulk_index import list_images
    from app.serving.predictor import Predictor
    from app.serving.store import SQLiteStore
    from app.serving.upload_checks import prepare
    from app.settings import Settings

    paths = list_images(folder)[:n]
    settings = Settings(device="cpu")
    predictor = Predictor.from_settings(settings)
    spec = predictor.card.input

    def cpu() -> float:
        return time.thread_time()

    t = cpu()
    blobs = [p.read_bytes() for p in paths]
    ids = [hashlib.sha256(b).hexdigest() for b in blobs]
    read = cpu() - t
    t = cpu()
    pixels = [prepare(b, spec, settings.max_image_pixels) for b in blobs]
    decode = cpu() - t
    predictor.forward(pixels[:batch])
    t = cpu()
    vectors = []
    for i in range(0, len(pixels), batch):
        vectors += [p.embedding for p in predictor.forward(pixels[i:i + batch])]
    forward = cpu() - t
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "s.sqlite3", 200_000)
        wall = time.perf_counter()
        t = cpu()
        for i in range(0, len(ids), ROWS):
            store.put_many("m", list(zip(ids[i:i + ROWS], vectors[i:i + ROWS], strict=True)),
                           [str(p) for p in paths[i:i + ROWS]])
        write, write_wall = cpu() - t, time.perf_counter() - wall
        store.close()
    figures = {"read+sha256": 1e3 * read / n, "prepare": 1e3 * decode / n,
               f"forward (batch {batch})": 1e3 * forward / n,
               f"SQLite put_many (batch {ROWS})": 1e3 * write / n,
               "SQLite put_many wall": 1e3 * write_wall / n}
    if redis_url:
        from app.serving.store.redis_store import RedisStore

        redis = RedisStore(redis_url, 200_000, prefix="bench-index")
        wall = time.perf_counter()
        t = cpu()
        for i in range(0, len(ids), ROWS):
            redis.put_many("m", list(zip(ids[i:i + ROWS], vectors[i:i + ROWS], strict=True)),
                           [str(p) for p in paths[i:i + ROWS]])
        figures[f"Redis put_many (batch {ROWS}), client CPU"] = 1e3 * (cpu() - t) / n
        figures["Redis put_many wall"] = 1e3 * (time.perf_counter() - wall) / n
        redis.close()
    return figures


def single(folder: Path, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "IMGREC_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "app.cli", "index", str(folder),
                              "--store", f"{tmp}/s.sqlite3", "--batch-size", str(batch),
                              "--no-progress"], env=env, capture_output=True, text=True,
                             check=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = out.stderr.strip().splitlines()[-1]
    # "... in 12.3 s (1234.5 images/s) ...": the indexing itself, model loading not counted
    seconds = float(re.search(r" in ([\d.]+) s \(", line).group(1))  # type: ignore[union-attr]
    images = int(line.split("indexed ")[1].split(" ")[0])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "process_wall_s": wall, "cpu_ms_per_image": 1e3 * cpu / images}


def descendants(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) of every process under root, and root itself."""
    children: dict[int, list[int]] = defaultdict(list)
    info: dict[int, tuple[str, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children[int(fields[1])].append(int(d))
        info[int(d)] = (cmd, (int(fields[11]) + int(fields[12])) / TICK)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in info:
            out[pid] = (_role(pid, root, info[pid][0]), info[pid][1])
        todo += children.get(pid, [])
    return out


def _role(pid: int, root: int, cmd: str) -> str:
    if pid == root:
        return "driver"
    for marker, role in (("MapWorker", "embedding actors"), ("StoreWriter", "writer actor"),
                         ("raylet", "raylet"), ("gcs_server", "GCS"),
                         ("ray::IDLE", "idle workers")):
        if marker in cmd:
            return role
    return "other Ray processes"


def ray_run(folder: Path, batch: int, decode_tasks: bool) -> dict[str, object]:
    from app.serving.ray_index.pipeline import RayOptions, run_ray_index
    from app.settings import Settings

    me = os.getpid()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(device="cpu", embed_store=f"{tmp}/s.sqlite3", max_batch_size=batch)
        before = descendants(me)
        tally = run_ray_index(str(folder), settings, RayOptions(progress=False,
                                                                decode_tasks=decode_tasks))
        after = descendants(me)
    roles: dict[str, float] = defaultdict(float)
    for pid, (role, cpu) in after.items():
        roles[role] += cpu - before.get(pid, (role, 0.0))[1]
    total = sum(roles.values())
    return {"images": tally.stored, "seconds": tally.seconds, "images_per_s": tally.images_per_s,
            "cpu_ms_per_image": 1e3 * total / tally.stored,
            "cpu_ms_per_image_by_role": {r: round(1e3 * c / tally.stored, 3)
                                         for r, c in sorted(roles.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "imgrec-bench-index")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="the local Ray's")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--redis", default=None, metavar="URL",
                    help="also time the Redis store's writes (a server with the search module)")
    args = ap.parse_args()
    import logging

    import ray

    logging.basicConfig(level=logging.WARNING)
    folder = make_images(args.dir / str(args.images), args.images)
    print(uptime(), flush=True)
    costs = stage_costs(folder, args.batch_size, args.redis)
    print(json.dumps({"stage_cpu_ms_per_image": {k: round(v, 4) for k, v in costs.items()}}))
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        for r in range(args.rounds):
            for name, run in (("single process", lambda: single(folder, args.batch_size)),
                              ("ray, decode fused", lambda: ray_run(folder, args.batch_size,
                                                                     False)),
                              ("ray, decode tasks", lambda: ray_run(folder, args.batch_size,
                                                                     True))):
                load = uptime()
                figures = run()
                print(json.dumps({"round": r + 1, "run": name, "uptime": load, **figures},
                                 default=lambda x: round(x, 3)), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
