"""Phone photos: imgrec against TorchServe on 12 MP JPEGs, the JPEG decoders, and the accuracy of
the scaled decode. Prints figures, asserts nothing.

1. Serving (the default): distinct 12 MP (4032x3024) photo-like JPEGs of 3-6 MB (bench/photolike.py:
   Fashion-MNIST test garments, tinted, unevenly lit, with grain) posted by wrk (one thread, the
   Lua script of bench/serve.py) to imgrec (default settings: scaled decode, 2 decode threads,
   batching) and to TorchServe 0.12 with 2 workers (one per core) and a Pillow handler
   (bench/torchserve_pillow_handler.py: Image.open, exif_transpose, convert, resize, as
   TorchServe's vision handlers do; imgrec's own network in eager PyTorch), same model, one run,
   one after the other: photos/s at concurrency 8, and p50 at concurrency 1 (one photo at a
   time). Server CPU is summed over each server's process tree.
2. ``--decoders``: CPU ms to decode one of those photos at the scale the shipped model needs
   (28 px input: 1/8), by each JPEG decoder that is installed: Pillow full size, Pillow draft,
   simplejpeg, PyTurboJPEG, pyvips.
3. ``--accuracy N``: the first N Fashion-MNIST test garments as photo-like JPEGs (default
   2016x1512, quality 90) through the shipped model in process: top-1 with the scaled decode
   (what imgrec serves) and with a full-size decode, and how often the two labels agree. The
   photos are made and decoded in worker processes (--workers).

    python bench/torchserve_compare.py --setup-only   # TorchServe's venv, once
    python bench/photos.py                            # serving, 20 s per point
    python bench/photos.py --decoders
    python bench/photos.py --accuracy 10000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.photolike import PHOTO_12MP, jpeg_bytes, photo_like  # noqa: E402
from bench.serve import Run, free_port, multipart_body, start_server, table, wrk  # noqa: E402
from bench.torchserve_compare import (  # noqa: E402
    MODEL_NAME,
    TS_VENV,
    TorchServe,
    check_answer,
    stop_imgrec,
)

SHIPPED = ROOT / "models" / "fashion-mnist"
PHOTO_COUNT = 40
TS_WORKERS = 2


def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    from app.training.data import load_fashion_mnist

    data = load_fashion_mnist("fashion-mnist")
    return data.test.images[:, 0].numpy(), data.test.labels.numpy()


def make_photos(directory: Path, count: int) -> list[int]:
    """count distinct 12 MP photos as multipart bodies 1.body .. count.body; returns sizes."""
    images, _ = fashion_test()
    directory.mkdir(parents=True, exist_ok=True)
    sizes = []
    for k in range(count):
        # grain and quality vary as between scenes and phones: 3-6 MB
        photo = photo_like(images[k], PHOTO_12MP, seed=k, grain=6.0 + 6.0 * (k % 5) / 4)
        data = jpeg_bytes(photo, quality=90 + k % 4)
        sizes.append(len(data))
        (directory / f"{k + 1}.body").write_bytes(multipart_body(data, f"photo{k}.jpg"))
    return sizes


# -- 1. serving -----------------------------------------------------------------------------------
class PillowTorchServe(TorchServe):
    """bench/torchserve_compare.py's TorchServe, with the Pillow handler and TS_WORKERS workers."""

    def __init__(self, work: Path, model_dir: Path) -> None:
        super().__init__(work, model_dir, "torch")
        text = self.config.read_text()
        text = text.replace("default_workers_per_model=1", f"default_workers_per_model="
                            f"{TS_WORKERS}")
        text = text.replace('"minWorkers": 1, "maxWorkers": 1',
                            f'"minWorkers": {TS_WORKERS}, "maxWorkers": {TS_WORKERS}')
        # TorchServe refuses bodies over 6.5 MB by default; phone photos are larger
        text += "max_request_size=33554432\n"
        self.config.write_text(text)
        self._build_pillow_mar(model_dir, work)

    def _build_pillow_mar(self, model_dir: Path, work: Path) -> None:
        config = work / "imgrec_handler.json"
        config.write_text(json.dumps({"root": str(ROOT), "engine": "torch"}))
        extra = [model_dir / "card.json", model_dir / "weights.safetensors", config]
        subprocess.run([str(TS_VENV / "bin" / "torch-model-archiver"), "--model-name",
                        MODEL_NAME, "--version", "1.0", "--handler",
                        str(ROOT / "bench" / "torchserve_pillow_handler.py"), "--extra-files",
                        ",".join(map(str, extra)), "--export-path", str(self.store), "--force"],
                       check=True, timeout=120, cwd=work)

    def _worker_ready(self) -> bool:
        import urllib.error
        import urllib.request

        url = f"http://127.0.0.1:{self.mgmt_port}/models/{MODEL_NAME}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                desc = json.loads(r.read())
        except urllib.error.HTTPError:
            return False
        workers = desc[0].get("workers", [])
        return sum(w.get("status") == "READY" for w in workers) == TS_WORKERS


def serving(args: argparse.Namespace) -> dict[str, object]:
    for tool, hint in (("wrk", "apt-get install -y wrk"),
                       ("java", "apt-get install -y openjdk-17-jre-headless")):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: {hint}")
    if not (TS_VENV / "bin" / "torchserve").exists():
        raise SystemExit(f"{TS_VENV} has no torchserve: python bench/torchserve_compare.py "
                         "--setup-only")
    tmp = Path(tempfile.mkdtemp(prefix="imgrec-photos-"))
    runs: list[Run] = []
    try:
        bodies = tmp / "photos"
        sizes = make_photos(bodies, args.photos)
        print(f"{args.photos} distinct 12 MP photos, {min(sizes) / 1e6:.1f}-"
              f"{max(sizes) / 1e6:.1f} MB (median {statistics.median(sizes) / 1e6:.1f}); "
              f"{args.seconds:g} s per point; {os.cpu_count()} cores", flush=True)

        def measure(label: str, port: int, path: str, pid: int) -> None:
            wrk(port, 2, 3, bodies, args.photos, pid, "warm-up", path)
            for conc in (args.concurrency, 1):
                run = wrk(port, conc, args.seconds, bodies, args.photos, pid, label, path)
                runs.append(run)
                print(table([run]).splitlines()[-1], flush=True)

        ts = PillowTorchServe(tmp / "torchserve", SHIPPED)
        try:
            ts.start()
            assert ts.proc is not None
            path = f"/predictions/{MODEL_NAME}"
            print(f"torchserve answer: {check_answer(ts.port, path, bodies)[:100]}...")
            measure(f"TorchServe 0.12, Pillow handler, {TS_WORKERS} workers", ts.port, path,
                    ts.proc.pid)
        except (RuntimeError, OSError, subprocess.SubprocessError):
            ts.print_logs()
            raise
        finally:
            ts.stop()
        port = free_port()
        proc = start_server("imgrec", SHIPPED, port, {}, tmp)
        try:
            print(f"imgrec answer: {check_answer(port, '/predict', bodies)[:100]}...")
            measure("imgrec (defaults)", port, "/predict", proc.pid)
        finally:
            stop_imgrec(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n" + table(runs) + "\n")
    ts_run, ts_one, im_run, im_one = runs
    ratio = im_run.rps / ts_run.rps if ts_run.rps else float("nan")
    print(f"photos/s at concurrency {args.concurrency}: imgrec {im_run.rps:.1f}, TorchServe "
          f"{ts_run.rps:.1f}: {ratio:.2f}x (goal >= 3x: {'met' if ratio >= 3 else 'NOT met'}); "
          f"one photo at a time, p50: imgrec {im_one.p50_ms:.1f} ms (goal < 30 ms: "
          f"{'met' if im_one.p50_ms < 30 else 'NOT met'}), TorchServe {ts_one.p50_ms:.1f} ms")
    if any(r.errors for r in runs):
        print("WARNING: failed requests; the figures above are not comparable")
    return {"runs": [r.__dict__ for r in runs], "ratio": ratio,
            "photo_mb": [round(s / 1e6, 2) for s in sizes]}


# -- 2. decoders ----------------------------------------------------------------------------------
def decoders(args: argparse.Namespace) -> dict[str, object]:
    import io

    from PIL import Image

    images, _ = fashion_test()
    photos = [jpeg_bytes(photo_like(images[k], PHOTO_12MP, seed=k, grain=6.0 + 1.5 * k),
                         quality=92) for k in range(3)]
    need = 56  # twice the shipped model's 28 px input: every decoder lands on 1/8 (504 x 378)

    def pillow_full(data: bytes) -> object:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.size

    def pillow_draft(data: bytes) -> object:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("L", (need, need))
            im.load()
            return im.size

    cands: dict[str, object] = {"Pillow, full size": pillow_full,
                                "Pillow draft (1/8, luma)": pillow_draft}
    try:
        import simplejpeg

        cands["simplejpeg (1/8, luma)"] = lambda d: simplejpeg.decode_jpeg(
            d, colorspace="GRAY", min_height=need, min_width=need).shape
    except ImportError:
        print("simplejpeg not installed")
    try:
        from turbojpeg import TJPF_GRAY, TurboJPEG

        tj = TurboJPEG()
        cands["PyTurboJPEG (1/8, luma)"] = lambda d: tj.decode(
            d, scaling_factor=(1, 8), pixel_format=TJPF_GRAY).shape
    except (ImportError, RuntimeError, OSError) as e:
        print(f"PyTurboJPEG not usable here: {str(e).splitlines()[0] if str(e) else e}")
    try:
        import pyvips

        pyvips.cache_set_max(0)
        pyvips.concurrency_set(1)
        cands["pyvips (shrink 8, luma)"] = lambda d: pyvips.Image.jpegload_buffer(
            d, shrink=8).colourspace("b-w").numpy().shape
    except (ImportError, OSError) as e:
        print(f"pyvips not usable here: {e}")
    print(f"photos: {', '.join(f'{len(p) / 1e6:.1f} MB' for p in photos)}; CPU ms per photo "
          f"(process time, best of {args.repeats} rounds; the median in brackets)")
    result: dict[str, object] = {}
    for name, fn in cands.items():
        assert callable(fn)
        per_round = []
        for _ in range(args.repeats):
            t0 = time.process_time()
            for data in photos:
                fn(data)
            per_round.append((time.process_time() - t0) * 1000 / len(photos))
        best, median = min(per_round), statistics.median(per_round)
        result[name] = {"best_ms": best, "median_ms": median}
        print(f"| {name} | {best:.1f} ({median:.1f}) |", flush=True)
    return result


# -- 3. accuracy ----------------------------------------------------------------------------------
def _decode_pair(job: tuple[int, np.ndarray, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    from app.model import ModelCard
    from app.model.decode import load_input

    k, garment, size = job
    spec = ModelCard.model_validate_json((SHIPPED / "card.json").read_text()).input
    data = jpeg_bytes(photo_like(garment, size, seed=k), quality=90)
    return load_input(data, spec), load_input(data, spec, scale=False)


def accuracy(args: argparse.Namespace) -> dict[str, object]:
    import torch

    from app.nn import load_model_dir
    from app.nn.tensors import normalize_batch

    images, labels = fashion_test()
    n = min(args.accuracy, len(images))
    size = (args.photo_width, args.photo_width * 3 // 4)
    loaded = load_model_dir(SHIPPED)
    model, spec = loaded.model.eval(), loaded.card.input

    def predict(batch: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            x = normalize_batch(torch.from_numpy(np.stack(batch)), spec)
            return model(x).argmax(1).numpy()

    t0 = time.perf_counter()
    scaled: list[np.ndarray] = []
    full: list[np.ndarray] = []
    step = 500
    jobs = [(k, images[k], size) for k in range(n)]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        for pair in pool.imap(_decode_pair, jobs, chunksize=8):
            pending.append(pair)
            if len(pending) == step or len(scaled) * step + len(pending) == n:
                scaled.append(predict([p[0] for p in pending]))
                full.append(predict([p[1] for p in pending]))
                pending = []
                done = sum(len(c) for c in scaled)
                s_, f_ = np.concatenate(scaled), np.concatenate(full)
                t = labels[:done]
                print(f"  {done}/{n}: scaled {100 * (s_ == t).mean():.2f}%, full "
                      f"{100 * (f_ == t).mean():.2f}% ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    a, b = np.concatenate(scaled), np.concatenate(full)
    truth = labels[:n]
    acc_s, acc_f = 100 * float((a == truth).mean()), 100 * float((b == truth).mean())
    agree = 100 * float((a == b).mean())
    print(f"{n} Fashion-MNIST test garments as {size[0]}x{size[1]} photo-like JPEGs (quality "
          f"90; made and decoded in {time.perf_counter() - t0:.0f} s): top-1 scaled decode "
          f"{acc_s:.2f}%, full decode {acc_f:.2f}%, difference {acc_s - acc_f:+.2f} points; "
          f"same label {agree:.2f}%")
    return {"n": n, "size": size, "top1_scaled": acc_s, "top1_full": acc_f, "agree": agree}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--decoders", action="store_true", help="compare the JPEG decoders")
    p.add_argument("--repeats", type=int, default=7, help="--decoders rounds")
    p.add_argument("--accuracy", type=int, default=0, metavar="N",
                   help="scaled vs full decode on N test garments")
    p.add_argument("--photo-width", type=int, default=2016, help="--accuracy photo width")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--photos", type=int, default=PHOTO_COUNT, help="distinct photos to serve")
    p.add_argument("--seconds", type=float, default=20.0, help="per wrk run")
    p.add_argument("--concurrency", type=int, default=8, help="for photos/s")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.decoders:
        report = decoders(args)
    elif args.accuracy:
        report = accuracy(args)
    else:
        report = serving(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
