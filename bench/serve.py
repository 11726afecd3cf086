"""Serving benchmark: prints figures, asserts nothing.

In one run, on this machine:
1. the in-process ceiling: the network alone at its best batch size (same thread count as served);
2. served throughput, p50/p99 latency and server CPU ms per request at concurrency 1, 16 and 64,
   with many distinct small PNG uploads: imgrec batching on, imgrec with max_batch_size=1, and a
   plain FastAPI server without batching (bench/baseline_fastapi.py) as the reference;
3. the same for the `resnet50` preset (random weights) with 224 px JPEG uploads.

The load generator is wrk (C, one thread) with a Lua script that round-robins pre-built multipart
bodies, so it costs a fraction of a core; its CPU is reported too.

    python bench/serve.py                 # everything (~5 minutes)
    python bench/serve.py --quick         # shorter runs
    python bench/serve.py --only fashion  # skip resnet50
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.model import InputSpec, ModelCard  # noqa: E402
from app.nn import create_model, save_model_dir  # noqa: E402

BOUNDARY = "BENCHBOUNDARY"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "134217728"}
TICK = os.sysconf("SC_CLK_TCK")
ENGINES = ("torch", "onnxruntime")


@dataclass
class Run:
    server: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_req: float
    loadgen_cpu_ms_per_req: float
    errors: int
    requests: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def process_tree(root: int) -> list[int]:
    """root and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu(root: int) -> dict[int, float]:
    out = {}
    for pid in process_tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[pid] = proc_cpu_s(pid)
    return out


def multipart_body(data: bytes, filename: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def make_bodies(directory: Path, count: int, kind: str) -> None:
    """Distinct uploads: 28x28 grey PNGs (Fashion-MNIST test images when installed) or
    224x224 RGB JPEGs."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images: np.ndarray | None = None
    if kind == "png28":
        try:
            from app.training.data import load_fashion_mnist

            images = load_fashion_mnist("fashion-mnist").test.images[:count, 0].numpy()
        except (ValueError, OSError):
            images = None
    for k in range(count):
        buf = io.BytesIO()
        if kind == "png28":
            arr = images[k] if images is not None else rng.integers(0, 256, (28, 28), np.uint8)
            Image.fromarray(arr, mode="L").save(buf, format="PNG")
        else:
            base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((224, 224), Image.Resampling.BILINEAR)
            img.save(buf, format="JPEG", quality=90)
        (directory / f"{k + 1}.body").write_bytes(multipart_body(buf.getvalue(), f"{k}.img"))


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server never became ready")


def start_server(kind: str, model_dir: Path, port: int, env_extra: dict[str, str],
                 tmp: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **MALLOC, **env_extra}
    if kind == "imgrec":
        env.update({"IMGREC_MODEL_DIR": str(model_dir), "IMGREC_PORT": str(port),
                    "IMGREC_DEVICE": "cpu", "IMGREC_LOG_LEVEL": "warning",
                    "IMGREC_EMBED_STORE": str(tmp / f"emb-{port}.sqlite3")})
        cmd = [str(Path(sys.executable).parent / "imgrec"), "serve"]
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "baseline_fastapi.py"), str(model_dir),
               str(port)]
        env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT)
    wait_ready(port, proc)
    return proc


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value.strip())
    if not m:
        return float("nan")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[m.group(2)]
    return float(m.group(1)) * scale


def wrk(port: int, concurrency: int, seconds: float, bodies: Path, count: int,
        pid: int, label: str, path: str = "/predict", script: str = "wrk_multipart.lua",
        env_extra: dict[str, str] | None = None) -> Run:
    """One wrk run; server CPU is summed over pid's process tree (TorchServe has several)."""
    env = {**os.environ, "BENCH_BODIES": str(bodies), "BENCH_COUNT": str(count),
           "BENCH_PATH": path, "BENCH_BOUNDARY": BOUNDARY, **(env_extra or {})}
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency",
           "--timeout", "30s", "-s", str(ROOT / "bench" / script),
           f"http://127.0.0.1:{port}{path}"]
    before = tree_cpu(pid)
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                         timeout=seconds + 60).stdout
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = tree_cpu(pid)
    server_cpu = sum(cpu - before.get(p, 0.0) for p, cpu in after.items())
    loadgen_cpu = (after_children.ru_utime + after_children.ru_stime
                   - before_children.ru_utime - before_children.ru_stime)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(errs.group(1)) if errs else 0) + (sum(map(int, sock.groups())) if sock else 0)
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    n = max(total, 1)
    return Run(label, concurrency, rps, p50, p99, 1000 * server_cpu / n, 1000 * loadgen_cpu / n,
               errors, total)


def ceiling(model_dir: Path, threads: int, seconds: float,
            engine: str = "torch") -> tuple[int, float, dict[int, float]]:
    """The network alone through one engine, exactly as served (BNs folded, uint8 batch in,
    normalisation in the engine): images/s per batch size."""
    from app.serving.predictor import Predictor

    predictor = Predictor(model_dir, "cpu", "float32", threads, engine)
    spec, run = predictor.card.input, predictor.engine
    rates: dict[int, float] = {}
    rng = np.random.default_rng(0)
    for bs in (1, 8, 16, 32, 64, 128):
        x = rng.integers(0, 256, (bs, spec.channels, spec.size, spec.size), dtype=np.uint8)
        run(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run(x)
            n += bs
        rates[bs] = n / (time.perf_counter() - t0)
        if spec.size > 64 and bs >= 16:
            break  # compute-bound: larger batches only cost memory
    best = max(rates, key=lambda b: rates[b])
    return best, rates[best], rates


def random_model(tmp: Path, preset: str) -> Path:
    torch.manual_seed(0)
    model = create_model(preset, 1000 if preset.startswith("resnet") else 10)
    c = model.config
    card = ModelCard(name=f"bench-{preset}", preset=preset, arch={},
                     labels=[f"class{i}" for i in range(model.num_classes)], embedding_dim=1,
                     input=InputSpec(size=c.input_size, channels=c.in_channels,
                                     mean=[0.5] * c.in_channels, std=[0.25] * c.in_channels))
    save_model_dir(model, card, tmp / preset)
    return tmp / preset


def run_ceiling_subprocess(model_dir: Path, threads: int, seconds: float,
                           engine: str) -> dict[str, object]:
    """The ceiling in a fresh process with the same malloc settings as the servers."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from pathlib import Path; from bench.serve import ceiling; "
            f"b, r, all_ = ceiling(Path({str(model_dir)!r}), {threads}, {seconds}, {engine!r}); "
            "print(json.dumps({'batch': b, 'rate': r, 'rates': all_}))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **MALLOC},
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def table(runs: list[Run]) -> str:
    lines = ["| server | conc. | req/s | p50 ms | p99 ms | server CPU ms/req | wrk CPU ms/req | "
             "errors |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.server} | {r.concurrency} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
              f"{r.cpu_ms_per_req:.2f} | {r.loadgen_cpu_ms_per_req:.2f} | {r.errors} |"
              for r in runs]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", default=str(ROOT / "models" / "fashion-mnist"))
    p.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    p.add_argument("--quick", action="store_true", help="3 s runs")
    p.add_argument("--only", choices=["fashion", "resnet50"], default=None)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    seconds = 3.0 if args.quick else args.seconds
    tmp = Path(tempfile.mkdtemp(prefix="imgrec-bench-"))
    report: dict[str, object] = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()}}
    print(f"machine: {report['machine']}\n")
    try:
        if args.only in (None, "fashion"):
            model_dir = Path(args.model_dir)
            if not (model_dir / "card.json").is_file():
                model_dir = random_model(tmp, "fashion")
            bodies = tmp / "png28"
            make_bodies(bodies, 2000, "png28")
            ceil = {e: run_ceiling_subprocess(model_dir, 1, 2.0, e) for e in ENGINES}
            for engine, c in ceil.items():
                print(f"fashion ({model_dir.name}) in-process ceiling, {engine}, 1 thread: best "
                      f"batch {c['batch']}: {c['rate']:.0f} img/s; by batch: "
                      + ", ".join(f"{b}: {r:.0f}" for b, r in dict(c["rates"]).items()))  # type: ignore[call-overload]
            runs: list[Run] = []
            servers = [("imgrec (batching, max 32)", "imgrec", {}),
                       ("imgrec, engine=torch (batching)", "imgrec", {"IMGREC_ENGINE": "torch"}),
                       ("imgrec (max_batch_size=1)", "imgrec", {"IMGREC_MAX_BATCH_SIZE": "1"}),
                       ("plain FastAPI, no batching", "baseline", {})]
            for label, kind, env in servers:
                port = free_port()
                proc = start_server(kind, model_dir, port, env, tmp)  # type: ignore[arg-type]
                try:
                    wrk(port, 4, 2, bodies, 2000, proc.pid, "warm-up")
                    for conc in (1, 16, 64):
                        run = wrk(port, conc, seconds, bodies, 2000, proc.pid, label)
                        runs.append(run)
                        print(table([run]).splitlines()[-1], flush=True)
                finally:
                    proc.terminate()
                    proc.wait(60)
            print("\n" + table(runs) + "\n")
            report["fashion"] = {"ceiling": ceil, "runs": [asdict(r) for r in runs]}
        if args.only in (None, "resnet50"):
            model_dir = random_model(tmp, "resnet50")
            bodies = tmp / "jpeg224"
            make_bodies(bodies, 300, "jpeg224")
            threads = os.cpu_count() or 1
            ceil = {e: run_ceiling_subprocess(model_dir, threads, 4.0, e) for e in ENGINES}
            for engine, c in ceil.items():
                print(f"resnet50 in-process ceiling, {engine}, {threads} threads: best batch "
                      f"{c['batch']}: {c['rate']:.1f} img/s")
            port = free_port()
            env = {"IMGREC_TORCH_THREADS": str(threads), "IMGREC_MAX_BATCH_SIZE": "16",
                   "IMGREC_REQUEST_TIMEOUT_MS": "60000"}
            proc = start_server("imgrec", model_dir, port, env, tmp)
            try:
                wrk(port, 4, 3, bodies, 300, proc.pid, "warm-up")
                run = wrk(port, 16, max(seconds, 15), bodies, 300, proc.pid,
                          "imgrec resnet50 (batching, max 16)")
            finally:
                proc.terminate()
                proc.wait(60)
            # served by the default engine on the CPU (onnxruntime): compare with its ceiling
            ratio = run.rps / float(ceil["onnxruntime"]["rate"])  # type: ignore[arg-type]
            print(table([run]))
            print(f"\nresnet50 served (onnxruntime) / in-process onnxruntime ceiling at "
                  f"concurrency 16: {ratio:.2f}")
            report["resnet50"] = {"ceiling": ceil, "run": asdict(run), "ratio": ratio}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
