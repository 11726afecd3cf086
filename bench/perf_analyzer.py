"""Triton's own benchmark tool, perf_analyzer, against imgrec over HTTP and gRPC: prints figures
and the exact commands, asserts nothing.

perf_analyzer reads the model's configuration (``GET /v2/models/{name}/config``, gRPC
``ModelConfig``) and metadata, then sends ``ModelInfer`` requests at a fixed concurrency until
three measurement windows agree. The images are real files (distinct 28x28 Fashion-MNIST test
images when installed, PNG or JPEG) given through ``--input-data``: a JSON file whose ``b64``
fields hold each ``image`` tensor as Triton serialises a BYTES tensor (a 4-byte little-endian
length, then the file), so every request is one encoded image, as a client's would be.

The binary: the wheel of tritonclient 2.50.0 (the last to carry it) has ``perf_analyzer`` under
``tritonclient-2.50.0.data/data/bin/``; it links ``libcudart.so.12`` (PyPI's
nvidia-cuda-runtime-cu12; no GPU is used) and Debian's ``libb64-0d``. ``--setup`` downloads
both wheels with pip and unpacks the two files into build/perf_analyzer/ (``./dev setup`` runs
it); ``PERF_ANALYZER=/path/to/perf_analyzer`` uses another binary.

    python bench/perf_analyzer.py --setup          # once: fetch the binary
    python bench/perf_analyzer.py                  # serve the shipped model; c = 1, 4, 16, 64
    python bench/perf_analyzer.py --concurrency 1,8 --image-format jpeg
    python bench/perf_analyzer.py --url 127.0.0.1:8000 --grpc-url 127.0.0.1:8001  # running server
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import orjson
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.oip import pngs  # noqa: E402
from bench.serve import free_port, start_server, tree_cpu  # noqa: E402

TRITONCLIENT_WITH_BINARY = "tritonclient==2.50.0"
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12==12.9.79"
WHEEL_BINARY = "tritonclient-2.50.0.data/data/bin/perf_analyzer"
WHEEL_CUDART = "nvidia/cuda_runtime/lib/libcudart.so.12"
DEFAULT_HOME = ROOT / "build" / "perf_analyzer"


@dataclass(frozen=True, slots=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]  # LD_LIBRARY_PATH with libcudart.so.12

    def command(self, *args: str) -> list[str]:
        return [str(self.binary), *args]


def locate(home: Path = DEFAULT_HOME) -> PerfAnalyzer | None:
    """A perf_analyzer that runs here ($PERF_ANALYZER, build/perf_analyzer/, or on PATH), or
    None (not set up, or a library missing: then --setup, and apt-get install libb64-0d)."""
    lib = home / "lib"
    env = {**os.environ,
           "LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(lib), os.environ.get(
               "LD_LIBRARY_PATH", "")) if p)}
    for candidate in (os.environ.get("PERF_ANALYZER"), home / "bin" / "perf_analyzer",
                      shutil.which("perf_analyzer")):
        if candidate and Path(candidate).is_file():
            found = PerfAnalyzer(Path(candidate), env)
            if runs(found):
                return found
    return None


def runs(pa: PerfAnalyzer) -> bool:
    try:
        return subprocess.run(pa.command("--version"), env=pa.env, capture_output=True,
                              timeout=30).returncode == 0
    except OSError:
        return False


def setup(home: Path = DEFAULT_HOME) -> PerfAnalyzer:
    """Download the two wheels with pip and unpack perf_analyzer and libcudart.so.12."""
    (home / "bin").mkdir(parents=True, exist_ok=True)
    (home / "lib").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        for spec, member, dest in ((TRITONCLIENT_WITH_BINARY, WHEEL_BINARY, home / "bin"),
                                   (CUDA_RUNTIME, WHEEL_CUDART, home / "lib")):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--only-binary", ":all:", "-d", tmp, spec], check=True)
            name = spec.split("==")[0].replace("-", "_")
            wheel = next(Path(tmp).glob(f"{name}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                target = dest / Path(member).name
                target.write_bytes(z.read(member))
                target.chmod(0o755)
    found = locate(home)
    if found is None:
        raise RuntimeError(f"perf_analyzer unpacked into {home} does not run: is Debian's "
                           "libb64-0d installed (apt-get install libb64-0d)?")
    return found


# -- input data ----------------------------------------------------------------------------------
def encode(images: list[bytes], image_format: str) -> list[bytes]:
    """The PNGs as they are, or re-encoded as JPEG (quality 90)."""
    if image_format == "png":
        return images
    out = []
    for png in images:
        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_input_data(path: Path, files: list[bytes], tensor: str = "image") -> Path:
    """perf_analyzer's --input-data JSON: one step per file; ``b64`` is the BYTES tensor of one
    batch element in Triton's serialisation (4-byte little-endian length, then the bytes)."""
    steps = [{tensor: {"b64": base64.b64encode(struct.pack("<I", len(f)) + f).decode()}}
             for f in files]
    path.write_bytes(orjson.dumps({"data": steps}))
    return path


# -- runs ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class Figures:
    protocol: str
    concurrency: int
    infer_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_cpu_ms: float  # per request answered, over the whole perf_analyzer run (nan: unknown)
    command: str


def perf_command(pa: PerfAnalyzer, protocol: str, url: str, model: str, data: Path,
                 concurrency: int, csv_path: Path, window_ms: int, stability: int,
                 batch: int = 1) -> list[str]:
    return pa.command(
        "-m", model, "-i", protocol, "-u", url, "--input-data", str(data), "-b", str(batch),
        "--concurrency-range", f"{concurrency}:{concurrency}", "-p", str(window_ms),
        # three windows within this percentage of each other count as stable: 10 % (the
        # default) is rarely reached on a shared 2-core machine
        "-s", str(stability), "--max-trials", "10", "-f", str(csv_path))


def run_once(pa: PerfAnalyzer, protocol: str, url: str, model: str, data: Path,
             concurrency: int, tmp: Path, window_ms: int = 3000, stability: int = 50,
             server_pid: int | None = None, metrics_url: str | None = None,
             timeout_s: float = 600) -> Figures:
    csv_path = tmp / f"{protocol}-{concurrency}.csv"
    cmd = perf_command(pa, protocol, url, model, data, concurrency, csv_path, window_ms,
                       stability)
    cpu0 = sum(tree_cpu(server_pid).values()) if server_pid else 0.0
    answered0 = infer_count(metrics_url, protocol) if metrics_url else 0.0
    done = subprocess.run(cmd, env=pa.env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({done.returncode}): {shlex.join(cmd)}\n"
                           f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    row = next(csv.DictReader(csv_path.read_text().splitlines()))
    cpu_ms = float("nan")
    if server_pid and metrics_url:
        answered = infer_count(metrics_url, protocol) - answered0
        cpu_ms = 1000 * (sum(tree_cpu(server_pid).values()) - cpu0) / max(answered, 1)
    return Figures(protocol, concurrency, float(row["Inferences/Second"]),
                   float(row["p50 latency"]) / 1000, float(row["p90 latency"]) / 1000,
                   float(row["p99 latency"]) / 1000, cpu_ms, shlex.join(cmd))


def infer_count(metrics_url: str, protocol: str) -> float:
    """Inference requests imgrec has answered on this protocol (any status), from /metrics."""
    route = 'route="POST /v2/models/{name}/infer"' if protocol == "http" else \
        'route="gRPC ModelInfer"'
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("imgrec_requests_total{") and route in line)


def table(rows: list[Figures]) -> str:
    lines = ["| protocol | concurrency | infer/s | p50 ms | p90 ms | p99 ms | server CPU ms/req |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.protocol} | {r.concurrency} | {r.infer_per_s:,.0f} | {r.p50_ms:.1f} | "
              f"{r.p90_ms:.1f} | {r.p99_ms:.1f} | {r.server_cpu_ms:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setup", action="store_true", help="fetch the binary into build/, then exit")
    p.add_argument("--model-dir", default=str(ROOT / "models" / "fashion-mnist"))
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated")
    p.add_argument("--protocols", default="http,grpc")
    p.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer's -p")
    p.add_argument("--stability", type=int, default=50, help="perf_analyzer's -s (percent)")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--image-format", choices=("png", "jpeg"), default="png")
    p.add_argument("--url", help="HTTP host:port of a running imgrec (else one is started)")
    p.add_argument("--grpc-url", help="gRPC host:port of that running imgrec")
    args = p.parse_args()
    if args.setup:
        print(f"perf_analyzer: {setup().binary}")
        return 0
    pa = locate()
    if pa is None:
        print("no perf_analyzer here: python bench/perf_analyzer.py --setup (and apt-get "
              "install libb64-0d)", file=sys.stderr)
        return 2
    model_dir = Path(args.model_dir)
    model = orjson.loads((model_dir / "card.json").read_bytes())["name"]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    protocols = args.protocols.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="imgrec-perf-analyzer-"))
    proc = None
    try:
        files = encode(pngs(args.images), args.image_format)
        data = write_input_data(tmp / "input.json", files)
        if args.url:
            urls = {"http": args.url, "grpc": args.grpc_url or ""}
            pid, metrics = None, None
        else:
            port, grpc_port = free_port(), free_port()
            proc = start_server("imgrec", model_dir, port, {"IMGREC_GRPC_PORT": str(grpc_port)},
                                tmp)
            urls = {"http": f"127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}"}
            pid, metrics = proc.pid, f"http://127.0.0.1:{port}/metrics"
        rows = []
        started = time.time()
        for protocol in protocols:
            for c in concurrencies:
                r = run_once(pa, protocol, urls[protocol], model, data, c, tmp,
                             args.window_ms, args.stability, pid, metrics)
                rows.append(r)
                print(f"$ {r.command}\n{table([r]).splitlines()[-1]}", flush=True)
        print(f"\n{table(rows)}\n")
        print(f"{len(files)} {args.image_format} images (28x28), one per request; "
              f"{time.time() - started:.0f} s; machine: "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
