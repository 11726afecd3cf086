"""Soak benchmark: a long run at steady concurrency, watching for drift. Prints figures and writes a
plot; asserts nothing.

Starts `imgrec serve` (or targets --url/--pid), then keeps --concurrency clients busy for
--duration-s with uploads of every format the server accepts (app/serving/upload_checks.py
ALLOWED_FORMATS, read at run time), at several sizes, mixed with bad uploads (not an image, a
truncated image, a pixel bomb's header, an empty part, a request without a file part). Every
--sample-s it records the server's RSS and open file descriptors and the window's latency
percentiles; at the end it reports the drift, the answers by kind and status (a valid upload not
answered 200, or any 5xx / transport error, counts as unexpected) and writes soak.png and
soak.json into --out-dir.

    python bench/soak.py                      # the documented long run: 10 minutes at 64
    python bench/soak.py --duration-s 180     # 3 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.serving.upload_checks import ALLOWED_FORMATS  # noqa: E402

SIZES = ((28, 28, "L"), (96, 64, "RGB"), (640, 480, "RGB"))


@dataclass(frozen=True)
class Upload:
    kind: str  # "PNG 28x28", ..., or "bad: ..."
    filename: str
    data: bytes
    field: str = "file"

    @property
    def valid(self) -> bool:
        return not self.kind.startswith("bad")


def encode(fmt: str, width: int, height: int, mode: str, seed: int) -> bytes | None:
    """The image in `fmt`, or None when this Pillow cannot write the format."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, 3)
    # smooth content compresses like a photo, noise would not
    base = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), *shape[2:]),
                        dtype=np.uint8)
    img = Image.fromarray(base, mode=mode).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (KeyError, OSError, ValueError):
        try:  # HEIF/HEIC writers come with pillow-heif's plug-in
            import pillow_heif

            pillow_heif.register_heif_opener()
            buf = io.BytesIO()
            img.save(buf, format=fmt)
        except (ImportError, KeyError, OSError, ValueError):
            return None
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, with no pixel data (a pixel bomb's
    header: the server must refuse it from the header alone)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    chunk = b"IHDR" + ihdr
    iend = b"\x00\x00\x00\x00IEND" + zlib.crc32(b"IEND").to_bytes(4, "big")
    return (b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + chunk
            + zlib.crc32(chunk).to_bytes(4, "big") + iend)


def make_uploads(variants: int) -> tuple[list[Upload], list[Upload], list[str]]:
    valid: list[Upload] = []
    skipped: list[str] = []
    for fmt in sorted(ALLOWED_FORMATS):
        for width, height, mode in SIZES:
            for v in range(variants):
                seed = zlib.crc32(f"{fmt} {width} {v}".encode())
                data = encode(fmt, width, height, mode, seed)
                if data is None:
                    skipped.append(fmt)
                    break
                valid.append(Upload(f"{fmt} {width}x{height}", f"{v}.{fmt.lower()}", data))
    png = encode("PNG", 96, 64, "RGB", 1) or b""
    bad = [Upload("bad: not an image", "notes.txt", b"hello, this is not an image\n" * 20),
           Upload("bad: truncated", "cut.png", png[: len(png) // 2]),
           Upload("bad: pixel bomb header", "bomb.png", png_header(60_000, 60_000)),
           Upload("bad: empty part", "empty.png", b""),
           Upload("bad: no file part", "a.png", png, field="image")]
    return valid, bad, sorted(set(skipped))


@dataclass
class Window:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)


@dataclass
class Sample:
    t_s: float
    rss_mb: float
    fds: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, url: str, pid: int, valid: list[Upload], bad: list[Upload],
                 bad_fraction: float, seed: int) -> None:
        self.url, self.pid = url, pid
        self.valid, self.bad, self.bad_fraction = valid, bad, bad_fraction
        self.rng = random.Random(seed)
        self.window = Window()
        self.answers: Counter[tuple[str, str]] = Counter()  # (kind, status or error)
        self.unexpected: Counter[tuple[str, str]] = Counter()
        self.samples: list[Sample] = []

    def pick(self) -> Upload:
        pool = self.bad if self.rng.random() < self.bad_fraction else self.valid
        return self.rng.choice(pool)

    async def client(self, session: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() < until:
            upload = self.pick()
            form = aiohttp.FormData()
            form.add_field(upload.field, upload.data, filename=upload.filename,
                           content_type="application/octet-stream")
            started = time.perf_counter()
            try:
                async with session.post(self.url + "/predict", data=form) as r:
                    await r.read()
                    outcome = str(r.status)
            except (TimeoutError, aiohttp.ClientError) as e:
                outcome = type(e).__name__
            self.window.latencies_ms.append((time.perf_counter() - started) * 1000)
            self.window.statuses[int(outcome) if outcome.isdigit() else 0] += 1
            self.answers[(upload.kind, outcome)] += 1
            if (upload.valid and outcome != "200") or not outcome.isdigit() \
                    or outcome.startswith("5"):
                self.unexpected[(upload.kind, outcome)] += 1

    async def sampler(self, started: float, until: float, every_s: float) -> None:
        while time.monotonic() < until:
            await asyncio.sleep(min(every_s, max(0.0, until - time.monotonic())))
            window, self.window = self.window, Window()
            lat = np.array(window.latencies_ms or [np.nan])
            n = len(window.latencies_ms)
            errors = sum(c for s, c in window.statuses.items() if s == 0 or s >= 500)
            self.samples.append(Sample(
                round(time.monotonic() - started, 1), round(rss_mb(self.pid), 1),
                open_fds(self.pid), round(n / every_s, 1),
                round(float(np.percentile(lat, 50)), 2), round(float(np.percentile(lat, 99)), 2),
                errors))
            s = self.samples[-1]
            print(f"  t={s.t_s:6.0f} s  {s.rps:6.0f} req/s  p50 {s.p50_ms:6.1f} ms  "
                  f"p99 {s.p99_ms:7.1f} ms  RSS {s.rss_mb:7.1f} MB  fds {s.fds:4d}  "
                  f"5xx/transport {s.errors}", flush=True)

    async def run(self, duration_s: float, concurrency: int, sample_s: float) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            started = time.monotonic()
            until = started + duration_s
            await asyncio.gather(self.sampler(started, until, sample_s),
                                 *(self.client(session, until) for _ in range(concurrency)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: Path, store: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "IMGREC_MODEL_DIR": str(model_dir), "IMGREC_DEVICE": "cpu",
           "IMGREC_PORT": str(port), "IMGREC_EMBED_STORE": store, "IMGREC_LOG_LEVEL": "warning",
           "MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "134217728",
           "PYTHONPATH": str(ROOT)}
    imgrec = Path(sys.executable).parent / "imgrec"
    proc = subprocess.Popen([str(imgrec), "serve"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"imgrec serve exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("imgrec serve did not become ready within 300 s")


def drift(samples: list[Sample], warmup_s: float) -> dict[str, float]:
    settled = [s for s in samples if s.t_s >= warmup_s] or samples
    first, last = settled[0], settled[-1]
    return {"from_s": first.t_s, "to_s": last.t_s,
            "rss_mb_first": first.rss_mb, "rss_mb_last": last.rss_mb,
            "rss_mb_max": max(s.rss_mb for s in settled),
            "rss_drift_mb": round(last.rss_mb - first.rss_mb, 1),
            "fds_first": first.fds, "fds_last": last.fds,
            "fds_max": max(s.fds for s in settled)}


def plot(samples: list[Sample], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t_s / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [s.p50_ms for s in samples], label="p50")
    axes[0].plot(t, [s.p99_ms for s in samples], label="p99")
    axes[0].set_ylabel("latency (ms)")
    axes[0].legend(loc="upper right")
    axes[1].plot(t, [s.rss_mb for s in samples], color="tab:red")
    axes[1].set_ylabel("server RSS (MB)")
    axes[2].plot(t, [s.fds for s in samples], color="tab:green")
    axes[2].set_ylabel("server open fds")
    axes[2].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--warmup-s", type=float, default=30.0,
                   help="drift is measured from the first sample after this")
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--variants", type=int, default=4, help="distinct images per format/size")
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "fashion-mnist")
    p.add_argument("--store", default="memory", help="IMGREC_EMBED_STORE of the started server")
    p.add_argument("--url", help="soak a server already running (needs --pid)")
    p.add_argument("--pid", type=int, help="its process id, for RSS and fds")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    valid, bad, skipped = make_uploads(args.variants)
    kinds = sorted({u.kind for u in valid})
    print(f"formats accepted by the server: {', '.join(sorted(ALLOWED_FORMATS))}")
    if skipped:
        print(f"  not encodable by this Pillow (left out): {', '.join(skipped)}")
    print(f"{len(valid)} valid uploads ({len(kinds)} format/size kinds), {len(bad)} bad kinds, "
          f"{args.bad_fraction:.0%} bad; concurrency {args.concurrency}, "
          f"{args.duration_s:g} s", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    proc: subprocess.Popen[bytes] | None = None
    if args.url:
        if args.pid is None:
            p.error("--url needs --pid")
        url, pid = args.url.rstrip("/"), args.pid
    else:
        log = Path(tempfile.mkdtemp(prefix="soak-")) / "imgrec.log"
        proc, url = start_server(args.model_dir, args.store, log)
        pid = proc.pid
        print(f"imgrec serve pid {pid} at {url} (log {log})", flush=True)
    client_cpu0 = time.process_time()
    soak = Soak(url, pid, valid, bad, args.bad_fraction, args.seed)
    try:
        asyncio.run(soak.run(args.duration_s, args.concurrency, args.sample_s))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    client_cpu = time.process_time() - client_cpu0

    total = sum(soak.answers.values())
    d = drift(soak.samples, args.warmup_s)
    lat_p50 = [s.p50_ms for s in soak.samples]
    lat_p99 = [s.p99_ms for s in soak.samples]
    print(f"\n{total} requests in {args.duration_s:g} s ({total / args.duration_s:.0f} req/s); "
          f"load generator CPU {client_cpu:.0f} s")
    print(f"RSS {d['rss_mb_first']} -> {d['rss_mb_last']} MB (drift {d['rss_drift_mb']:+} MB, "
          f"max {d['rss_mb_max']}) and open fds {d['fds_first']} -> {d['fds_last']} "
          f"(max {d['fds_max']}) from t={d['from_s']:.0f} s to t={d['to_s']:.0f} s")
    print(f"window p50 {min(lat_p50):.1f}-{max(lat_p50):.1f} ms, "
          f"window p99 {min(lat_p99):.1f}-{max(lat_p99):.1f} ms")
    print("answers by kind and status:")
    for (kind, status), n in sorted(soak.answers.items()):
        print(f"  {kind:28s} {status:>22s} {n:8d}")
    print(f"unexpected (valid upload not 200, any 5xx or transport error): "
          f"{sum(soak.unexpected.values())} {dict(soak.unexpected) or ''}")

    title = (f"imgrec soak: concurrency {args.concurrency}, {args.duration_s / 60:g} min, "
             f"{args.bad_fraction:.0%} bad uploads")
    plot(soak.samples, args.out_dir / "soak.png", title)
    (args.out_dir / "soak.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "requests": total,
        "drift": d, "answers": {f"{k} -> {s}": n for (k, s), n in sorted(soak.answers.items())},
        "unexpected": {f"{k} -> {s}": n for (k, s), n in soak.unexpected.items()},
        "samples": [vars(s) for s in soak.samples]}, indent=1))
    print(f"plot: {args.out_dir / 'soak.png'}; figures: {args.out_dir / 'soak.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
