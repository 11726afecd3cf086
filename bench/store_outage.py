"""What a Redis outage does to served requests: latency and outcomes per phase, under load.

Starts redis-server and `imgrec serve` (the shipped model, Redis store) on loopback ports,
keeps N client threads posting one image each to /predict and /embed, and goes through:

    healthy -> hung (SIGSTOP: connects succeed, replies never come) -> resumed (SIGCONT)
            -> killed (SIGKILL: connection refused) -> restarted (a new, empty redis-server)

Prints, per phase: requests, non-200 answers, the share marked `X-Imgrec-Stored: false`, and
latency p50/p99/max. The hung phase is where a store without a circuit breaker would add its
timeout (IMGREC_EMBED_STORE_TIMEOUT_S) to every request.

    python bench/store_outage.py --seconds 5 --concurrency 8
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def start_redis(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--dir",
                             str(tmp), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait(lambda: socket.create_connection(("127.0.0.1", port), 0.5).close() is None, 20,
         "redis-server")
    return proc


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--store-timeout-s", type=float, default=1.0,
                   help="IMGREC_EMBED_STORE_TIMEOUT_S")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="imgrec-outage-"))
    redis_port, api_port = free_port(), free_port()
    redis = start_redis(redis_port, tmp)
    env = {**os.environ, "IMGREC_EMBED_STORE": f"redis://127.0.0.1:{redis_port}/0",
           "IMGREC_PORT": str(api_port), "IMGREC_DEVICE": "cpu", "IMGREC_LOG_LEVEL": "warning",
           "IMGREC_EMBED_STORE_TIMEOUT_S": str(args.store_timeout_s),
           "MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "134217728"}
    imgrec = shutil.which("imgrec", path=str(Path(sys.executable).parent)) or "imgrec"
    server = subprocess.Popen([imgrec, "serve"], env=env, cwd=tmp,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{api_port}"
    try:
        wait(lambda: urllib.request.urlopen(base + "/readyz", timeout=2).status == 200, 300,
             "imgrec /readyz")
        phase = ["healthy"]
        rows: list[tuple[str, int, str, float]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(t: int) -> None:
            with httpx.Client(timeout=60) as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    path = "/predict" if i % 2 else "/embed"
                    files = {"file": ("x.png", png(1_000_000 * (t + 1) + i), "image/png")}
                    started = time.perf_counter()
                    try:
                        r = c.post(base + path, files=files)
                        row = (r.status_code, r.headers.get("x-imgrec-stored", ""))
                    except httpx.HTTPError:
                        row = (0, "")
                    with lock:
                        rows.append((phase[0], *row, time.perf_counter() - started))

        threads = [threading.Thread(target=client, args=(t,), daemon=True)
                   for t in range(args.concurrency)]
        for th in threads:
            th.start()
        steps = [("healthy", None), ("hung", signal.SIGSTOP), ("resumed", signal.SIGCONT),
                 ("killed", signal.SIGKILL), ("restarted", None)]
        for name, sig in steps:
            if sig is not None:
                redis.send_signal(sig)
            if name == "restarted":
                redis.wait(10)
                redis = start_redis(redis_port, tmp)
            phase[0] = name
            time.sleep(args.seconds)
        stop.set()
        for th in threads:
            th.join(timeout=60)

        print(f"store_outage: concurrency {args.concurrency}, {args.seconds:g} s per phase, "
              f"IMGREC_EMBED_STORE_TIMEOUT_S={args.store_timeout_s:g}, {os.cpu_count()} cores")
        print(f"{'phase':10} {'requests':>8} {'non-200':>8} {'unstored':>9} "
              f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for name, _ in steps:
            mine = [r for r in rows if r[0] == name]
            if not mine:
                continue
            lat = np.array([r[3] for r in mine]) * 1000
            bad = sum(r[1] != 200 for r in mine)
            unstored = sum(r[2] == "false" for r in mine) / len(mine)
            print(f"{name:10} {len(mine):8d} {bad:8d} {unstored:9.0%} "
                  f"{np.percentile(lat, 50):8.1f} {np.percentile(lat, 99):8.1f} "
                  f"{lat.max():8.1f}")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        if redis.poll() is None:
            redis.send_signal(signal.SIGCONT)
            redis.kill()
            redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
