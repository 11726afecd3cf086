"""Slow clients benchmark: normal uploads while thousands of connections trickle. Prints figures,
asserts nothing.

In one run, against one `imgrec serve` of models/fashion-mnist (the default connection cap, from
the open-file limit), then a second one capped below the tricklers' count:

1. idle: normal uploads, one at a time, each on a fresh connection: p50 and p99;
2. the same while --tricklers connections trickle an upload's body at 2 bytes/s (issue 20's
   slow-loris: headers complete, body a byte every 0.5 s; cut by the body deadline, they
   reconnect at once);
3. the same while --tricklers connections trickle their request line and headers at 2 bytes/s
   (cut by the header deadline, they reconnect);
4. a server capped at --cap (below --tricklers) with the header tricklers of 3: the cap is
   always full, so every newcomer, upload or trickler, closes the trickler that has been at it
   longest. Before issue 20 every upload here was refused 503.

The tricklers run in a child process of their own (asyncio, one task per connection), so that
their cost lands on the machine, as an attacker's would, but not in the measuring client.
Figures per phase: uploads answered 200 and the others, latency p50/p99, and the server's CPU
and resident memory.

    python bench/slow_clients.py                      # 5,000 tricklers, 300 uploads per phase
    python bench/slow_clients.py --tricklers 1500 --cap 1000 --uploads 200
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BOUNDARY = "slowclientsbench"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the tricklers (a child process: python bench/slow_clients.py --trickle ...) --------------
async def trickle_one(port: int, phase: str, stats: dict[str, int], stop: asyncio.Event) -> None:
    """One connection trickling forever: reconnect whenever the server closes it."""
    if phase == "body":
        head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
                f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    else:
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: "
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats["connect_errors"] += 1
            await asyncio.sleep(0.5)
            continue
        stats["connected"] += 1
        stats["open"] += 1
        try:
            writer.write(head)
            while not stop.is_set() and not reader.at_eof():
                try:  # reading also notices the server's answer or close at once
                    data = await asyncio.wait_for(reader.read(4096), 0.5)
                except TimeoutError:
                    writer.write(b"a")  # 2 bytes/s
                    await writer.drain()
                    continue
                if data:
                    stats["answered"] += 1
                    break
        except OSError:
            pass
        finally:
            stats["open"] -= 1
            writer.close()


async def trickle_main(port: int, count: int, phase: str) -> None:
    stats = {"connected": 0, "open": 0, "answered": 0, "connect_errors": 0}
    stop = asyncio.Event()
    tasks = []
    for i in range(count):  # ramp up: the listen backlog holds 2048
        tasks.append(asyncio.ensure_future(trickle_one(port, phase, stats, stop)))
        if i % 200 == 199:
            await asyncio.sleep(0.2)
    while stats["connected"] < count:  # each has connected once (beyond a cap, some are
        await asyncio.sleep(0.2)           # already closed for room and reconnecting)
    await asyncio.sleep(1.0)
    print(json.dumps({"ready": True, **stats}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # the parent says stop
    print(json.dumps(stats), flush=True)
    stop.set()
    for t in tasks:
        t.cancel()


# -- the measuring side --------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    tricklers: int
    cap: str
    ok: int
    other: dict[str, int]
    p50_ms: float
    p99_ms: float
    server_cpu_pct: float
    server_rss_mb: float
    trickler_reconnects: int


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                    else 1 << 20, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upload_requests(count: int) -> list[bytes]:
    """Distinct 28x28 PNG uploads, each a complete request closing its connection."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, "PNG")
        body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + \
            buf.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode()
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        out.append(head + body)
    return out


def one_upload(port: int, request: bytes) -> tuple[str, float]:
    """(status or error, seconds) of one upload on a fresh connection."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        return type(e).__name__, time.perf_counter() - started
    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "no answer"
    return status, time.perf_counter() - started


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def measure(name: str, pid: int, port: int, requests: list[bytes], tricklers: int, cap: str,
            reconnects: int = 0) -> Phase:
    cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
    results = [one_upload(port, r) for r in requests]
    cpu, wall = proc_cpu_s(pid) - cpu0, time.perf_counter() - t0
    ok = sorted(s for status, s in results if status == "200")
    other: dict[str, int] = {}
    for status, _ in results:
        if status != "200":
            other[status] = other.get(status, 0) + 1
    p50 = float(np.percentile(ok, 50) * 1e3) if ok else float("nan")
    p99 = float(np.percentile(ok, 99) * 1e3) if ok else float("nan")
    return Phase(name, tricklers, cap, len(ok), other, p50, p99, 100 * cpu / wall, rss_mb(pid),
                 reconnects)


def start_server(port: int, model_dir: Path, tmp: Path, cap: int | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "IMGREC_MODEL_DIR": str(model_dir), "IMGREC_DEVICE": "cpu",
           "IMGREC_PORT": str(port), "IMGREC_EMBED_STORE": "memory", "IMGREC_GRPC_PORT": "0",
           "IMGREC_LOG_LEVEL": "warning", "MALLOC_MMAP_THRESHOLD_": "67108864",
           "MALLOC_TRIM_THRESHOLD_": "134217728", "PYTHONPATH": str(ROOT)}
    if cap is not None:
        env["IMGREC_MAX_CONNECTIONS"] = str(cap)
    imgrec = Path(sys.executable).parent / "imgrec"
    log = tmp / f"serve-{port}.log"
    proc = subprocess.Popen([str(imgrec), "serve"], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"imgrec serve exited: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("imgrec serve not ready after 180 s")


class Tricklers:
    def __init__(self, port: int, count: int, phase: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--trickle", str(port), str(count), phase],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.ready = json.loads(self.proc.stdout.readline() or "{}")
        if not self.ready.get("ready"):
            sys.exit("the tricklers did not connect")

    def stop(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        stats: dict[str, int] = json.loads(self.proc.stdout.readline() or "{}")
        self.proc.wait(30)
        return stats


def run_phase(name: str, pid: int, port: int, requests: list[bytes], tricklers: int,
              phase: str, cap: str) -> Phase:
    t = Tricklers(port, tricklers, phase)
    connected = t.ready["connected"]
    try:
        result = measure(name, pid, port, requests, tricklers, cap)
    finally:
        stats = t.stop()
    result.trickler_reconnects = stats.get("connected", connected) - connected
    return result


def print_table(phases: list[Phase], command: str) -> None:
    print(f"\n{command}\n")
    print(f"{'phase':<34} {'tricklers':>9} {'cap':>7} {'200':>5} {'other':<14} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'srv CPU':>7} {'RSS MB':>7} {'reconn':>7}")
    for p in phases:
        other = ",".join(f"{k}x{v}" for k, v in p.other.items()) or "-"
        print(f"{p.name:<34} {p.tricklers:>9} {p.cap:>7} {p.ok:>5} {other:<14} {p.p50_ms:>7.2f} "
              f"{p.p99_ms:>7.2f} {p.server_cpu_pct:>6.0f}% {p.server_rss_mb:>7.0f} "
              f"{p.trickler_reconnects:>7}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tricklers", type=int, default=5000)
    p.add_argument("--cap", type=int, default=1000, help="IMGREC_MAX_CONNECTIONS of phase 4")
    p.add_argument("--uploads", type=int, default=300, help="normal uploads per phase")
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "fashion-mnist")
    p.add_argument("--trickle", nargs=3, metavar=("PORT", "COUNT", "PHASE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    raise_file_limit()
    if args.trickle:
        asyncio.run(trickle_main(int(args.trickle[0]), int(args.trickle[1]), args.trickle[2]))
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    requests = upload_requests(args.uploads)
    random.seed(0)
    phases = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_server(port, args.model_dir, Path(tmp), None)
        try:
            measure("warm-up", server.pid, port, requests[:50], 0, "default")
            phases.append(measure("1 idle", server.pid, port, requests, 0, "default"))
            phases.append(run_phase("2 body tricklers, 2 B/s", server.pid, port, requests,
                                    args.tricklers, "body", "default"))
            phases.append(run_phase("3 header tricklers, 2 B/s", server.pid, port, requests,
                                    args.tricklers, "headers", "default"))
            phases.append(measure("1' idle again", server.pid, port, requests, 0, "default"))
        finally:
            server.terminate()
            server.wait(60)
        port = free_port()
        server = start_server(port, args.model_dir, Path(tmp), args.cap)
        try:
            measure("warm-up", server.pid, port, requests[:50], 0, str(args.cap))
            phases.append(measure("4a idle, capped", server.pid, port, requests, 0,
                                  str(args.cap)))
            phases.append(run_phase("4b header tricklers > cap", server.pid, port, requests,
                                    args.tricklers, "headers", str(args.cap)))
        finally:
            server.terminate()
            server.wait(60)
    print_table(phases, command)
    print(f"\nmachine: {os.cpu_count()} CPUs; tricklers and the measuring client run beside the "
          "server on it")


if __name__ == "__main__":
    main()
