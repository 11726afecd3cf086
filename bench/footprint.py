"""The CPU serving process's footprint, and float32 vs int8: prints figures, asserts nothing.

For the shipped model (and the `resnet50` preset with random weights at 224 px):
1. time from spawn to ready (`/readyz` 200) of `imgrec serve`, over several starts, and the CPU
   time the process used until then (on a busy machine the wall time mostly measures the wait
   for a core); once also for the shipped model without its graph (exported at start-up);
2. PSS and RSS of the serving process when ready and after a minute of load (wrk, concurrency
   16, distinct uploads), from /proc/PID/smaps_rollup; whether torch is mapped;
3. in-process throughput of the ONNX Runtime engine, float32 vs int8 graph, batch 1 and 32
   (16 for resnet50), one thread, as served;
4. served throughput, float32 vs int8 (IMGREC_PRECISION), concurrency 64 (16 for resnet50);
5. the int8 graph's test top-1 next to the float32 graph's, as `imgrec quantize` measured them
   into the card (the shipped model; resnet50's random weights have no accuracy to measure).

    python bench/footprint.py                      # everything (~6 minutes)
    python bench/footprint.py --only fashion       # the shipped model only
    python bench/footprint.py --load-seconds 10 --seconds 5   # shorter runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import MALLOC, free_port, make_bodies, random_model, wrk  # noqa: E402

SHIPPED = ROOT / "models" / "fashion-mnist"


def memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key] = int(rest.split()[0])
    return out


def maps_torch(pid: int) -> bool:
    return any("libtorch" in line or "/torch/" in line
               for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(model_dir: Path, port: int, tmp: Path, extra: dict[str, str]
          ) -> tuple[subprocess.Popen[bytes], float]:
    """`imgrec serve` as deployed on a CPU (tuned malloc, SQLite store); seconds to ready."""
    env = {**os.environ, **MALLOC, "IMGREC_MODEL_DIR": str(model_dir), "IMGREC_PORT": str(port),
           "IMGREC_LOG_LEVEL": "warning", "IMGREC_EMBED_STORE": str(tmp / f"e-{port}.sqlite3"),
           **extra}
    env.pop("IMGREC_DEVICE", None)
    started = time.monotonic()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "imgrec"), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"imgrec serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > 300:
            proc.kill()
            raise RuntimeError("never ready")
        time.sleep(0.01)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def in_process(model_dir: Path, precision: str, batches: tuple[int, ...], seconds: float
               ) -> dict[int, float]:
    code = (f"import json, sys, time, numpy as np; sys.path.insert(0, {str(ROOT)!r})\n"
            "from app.serving.predictor import Predictor\n"
            f"p = Predictor({str(model_dir)!r}, 'cpu', 'float32', 1, 'onnxruntime', "
            f"{precision!r})\n"
            "s = p.card.input; rates = {}\n"
            f"for bs in {batches!r}:\n"
            "    x = np.random.default_rng(0).integers(0, 256, (bs, s.channels, s.size, s.size),"
            " dtype=np.uint8)\n"
            "    p.engine(x); n, t0 = 0, time.perf_counter()\n"
            f"    while time.perf_counter() - t0 < {seconds}:\n"
            "        p.engine(x); n += bs\n"
            "    rates[bs] = n / (time.perf_counter() - t0)\n"
            "print(json.dumps(rates))\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **MALLOC},
                         capture_output=True, text=True, check=True).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def prepare_resnet50(parent: Path) -> Path:
    """resnet50 preset, random weights, with its graph and a calibrated int8 graph. Its card's
    int8 'accuracy' is measured on 32 Fashion-MNIST images against 1000 random classes: only
    the gate IMGREC_PRECISION=int8 needs, not a figure to read."""
    from app.model.directory import read_card
    from app.nn.export import export_model_dir
    from app.nn.quantize import quantize_model_dir
    from app.training.quantize_cli import load_split_arrays

    parent.mkdir(parents=True, exist_ok=True)
    d = random_model(parent, "resnet50")
    export_model_dir(d)
    card = read_card(SHIPPED)
    calibration, images, _, source = load_split_arrays(card, None, 32, 32, 0)
    rgb = lambda a: np.repeat(a, 3, axis=1)  # noqa: E731
    quantize_model_dir(d, rgb(calibration), rgb(images), np.zeros(len(images), np.int64),
                       source, threads=1)
    return d


def without_graphs(tmp: Path) -> Path:
    """The shipped directory as it was before it held its graph: exported at every start."""
    from app.model.directory import CARD_FILE, read_card

    d = tmp / "fashion-mnist-no-graph"
    shutil.copytree(SHIPPED, d)
    for name in ("model.onnx", "model.int8.onnx"):
        (d / name).unlink()
    card = read_card(d).model_copy(update={"graphs": {}})
    (d / CARD_FILE).write_text(card.model_dump_json(indent=2))
    return d


def baseline(tmp: Path) -> dict[str, object]:
    """One start of the shipped model without its graph (export at start-up, torch loaded)."""
    port = free_port()
    proc, ready = spawn(without_graphs(tmp), port, tmp, {})
    out = {"model": "fashion-mnist without model.onnx (export at start-up)", "ready_s": ready,
           "ready_cpu_s": cpu_s(proc.pid), "pss_ready_mib": memory_kib(proc.pid)["Pss"] / 1024,
           "torch_mapped": maps_torch(proc.pid)}
    stop(proc)
    return out


def measure(name: str, model_dir: Path, tmp: Path, args: argparse.Namespace, kind: str,
            batches: tuple[int, ...], conc: int) -> dict[str, object]:
    bodies = tmp / f"bodies-{kind}"
    if not bodies.exists():
        make_bodies(bodies, 500, kind)
    result: dict[str, object] = {"model": name}
    skip = set(args.skip.split(","))
    # 1, 2: ready time over several starts; memory when ready and after a minute of load
    readies, cpus = [], []
    for i in range(0 if "ready" in skip else args.starts):
        port = free_port()
        proc, ready = spawn(model_dir, port, tmp, {})
        readies.append(ready)
        cpus.append(cpu_s(proc.pid))
        if i == 0:
            result["pss_ready_mib"] = memory_kib(proc.pid)["Pss"] / 1024
            result["torch_mapped"] = maps_torch(proc.pid)
            run = wrk(port, 16, args.load_seconds, bodies, 500, proc.pid, "load")
            mem = memory_kib(proc.pid)
            result.update(pss_loaded_mib=mem["Pss"] / 1024, rss_loaded_mib=mem["Rss"] / 1024,
                          load_rps=run.rps, load_errors=run.errors,
                          load_seconds=args.load_seconds)
        stop(proc)
    if readies:
        result["ready_s"] = readies
        result["ready_s_median"] = statistics.median(readies)
        # CPU time the process used until ready: what the start costs on an idle core
        result["ready_cpu_s"] = cpus
        result["ready_cpu_s_median"] = statistics.median(cpus)
    # 3: in-process throughput, float32 vs int8
    for precision in () if "in-process" in skip else ("float32", "int8"):
        result[f"in_process_{precision}"] = in_process(model_dir, precision, batches,
                                                       args.seconds / 2)
    # 4: served throughput, float32 vs int8
    for precision in () if "served" in skip else ("float32", "int8"):
        port = free_port()
        proc, _ = spawn(model_dir, port, tmp, {"IMGREC_PRECISION": precision})
        wrk(port, 4, 2, bodies, 500, proc.pid, "warm-up")
        run = wrk(port, conc, args.seconds, bodies, 500, proc.pid, precision)
        result[f"served_{precision}"] = {"concurrency": conc, "rps": run.rps,
                                         "p50_ms": run.p50_ms, "p99_ms": run.p99_ms,
                                         "errors": run.errors}
        stop(proc)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["fashion", "resnet50"])
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--load-seconds", type=float, default=60.0)
    p.add_argument("--seconds", type=float, default=10.0, help="per throughput run")
    p.add_argument("--resnet50-dir", type=Path, help="keep the prepared resnet50 directory here "
                   "(reused when it already holds both graphs)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: ready, "
                   "in-process, served, baseline")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    from app.model.directory import read_card
    from app.nn.quantize import cpu_int8_features

    print(json.dumps({"cpu": platform.processor() or platform.machine(),
                      "int8_features": cpu_int8_features(), "cores": os.cpu_count()}))
    results = []
    with tempfile.TemporaryDirectory(prefix="imgrec-footprint-") as t:
        tmp = Path(t)
        if args.only in (None, "fashion") and "baseline" not in args.skip:
            print(json.dumps(baseline(tmp)), flush=True)
        if args.only in (None, "fashion"):
            r = measure("fashion-mnist (shipped)", SHIPPED, tmp, args, "png28", (1, 32), 64)
            m = read_card(SHIPPED).graphs["int8"].metrics
            r["accuracy"] = {k: m[k] for k in ("test_top1", "float32_test_top1",
                                               "top1_difference_points", "test_images")}
            print(json.dumps(r), flush=True)
            results.append(r)
        if args.only in (None, "resnet50"):
            d = args.resnet50_dir
            if d is None or not (d / "model.int8.onnx").is_file():
                d = prepare_resnet50(d.parent if d is not None else tmp)
            r = measure("resnet50 (random weights, 224 px)", d, tmp, args, "jpeg224",
                        (1, 16), 16)
            print(json.dumps(r), flush=True)
            results.append(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
