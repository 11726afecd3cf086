"""imgrec against TorchServe: same network, same uploads, same load, one run, this machine.

TorchServe 0.12 runs from its own virtual environment (.venv-torchserve, made by --setup) with
bench/torchserve_handler.py: imgrec's loader (no pickle) and imgrec's image preparation, TorchServe
batching at most 32 requests with a 5 ms max batch delay, one worker, one thread (the settings of
our earlier serving-systems comparison). The handler runs the network with eager PyTorch, as
TorchServe serves a PyTorch model; with --ts-engines torch,onnxruntime a second TorchServe also
runs imgrec's own ONNX Runtime engine in its handler, which leaves only the serving stacks
different. imgrec runs with its default settings (batching on, max 32). All get the same malloc
settings (bench/serve.py's MALLOC). Each is measured alone with the same wrk command and Lua script
as bench/serve.py at concurrency 1, 16 and 64; server CPU is the sum over the server's whole
process tree (TorchServe: the launcher, the Java frontend and its Python workers).

    python bench/torchserve_compare.py --setup          # make .venv-torchserve (a few minutes)
    python bench/torchserve_compare.py                  # 10 s per point (~2 minutes)
    python bench/torchserve_compare.py --seconds 3      # short runs
    python bench/torchserve_compare.py --ts-engines torch,onnxruntime  # both handlers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import (  # noqa: E402
    BOUNDARY,
    MALLOC,
    Run,
    free_port,
    make_bodies,
    process_tree,
    random_model,
    start_server,
    table,
    wrk,
)

TS_VENV = ROOT / ".venv-torchserve"
TS_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "torchserve", "torch-model-archiver",
               # what the handler imports from imgrec's app.nn / app.serving.upload_checks
               "numpy", "pillow", "safetensors", "pydantic", "simplejpeg", "pillow-heif",
               # imgrec's ONNX Runtime engine, for --ts-engines onnxruntime (imgrec's own pins)
               "onnxruntime==1.32.0", "onnxscript==0.7.2", "onnx==1.23.2",
               "pyyaml"]  # torchserve 0.12's worker imports yaml but does not declare it
MODEL_NAME = "imgrec"
BODY_COUNT = 2000
CONCURRENCIES = (1, 16, 64)

LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="{log}" append="true">
      <PatternLayout pattern="%d{{ISO8601}} [%-5p] %t %c - %m%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Root level="warn"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


def setup_venv() -> None:
    if not (TS_VENV / "bin" / "python").exists():
        subprocess.run(["python3.11", "-m", "venv", str(TS_VENV)], check=True, timeout=300)
    subprocess.run([str(TS_VENV / "bin" / "pip"), "install", *TS_PACKAGES], check=True,
                   timeout=1800)


def check_answer(port: int, path: str, bodies: Path) -> str:
    """One request by hand: the server must answer 200 with top-5 labels."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=(bodies / "1.body").read_bytes(), method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{path} answered {e.code}: {e.read()[:500]!r}") from None
    answer = json.loads(text)
    labels = (answer["results"][0] if "results" in answer else answer)["labels"]
    if len(labels) != 5:
        raise RuntimeError(f"{path}: expected 5 labels, got {text[:300]}")
    return text


def build_mar(model_dir: Path, store: Path, work: Path, engine: str) -> None:
    from app.settings import Settings

    config = work / "imgrec_handler.json"
    settings = Settings()
    config.write_text(json.dumps({"root": str(ROOT), "max_pixels": settings.max_image_pixels,
                                  "warmup_batches": settings.warmup_batches,
                                  "max_batch_size": settings.max_batch_size,
                                  "engine": engine}))
    extra = [model_dir / "card.json", model_dir / "weights.safetensors", config]
    subprocess.run([str(TS_VENV / "bin" / "torch-model-archiver"), "--model-name", MODEL_NAME,
                    "--version", "1.0", "--handler", str(ROOT / "bench" / "torchserve_handler.py"),
                    "--extra-files", ",".join(map(str, extra)), "--export-path", str(store),
                    "--force"], check=True, timeout=120, cwd=work)


def wait_for(check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str,
             timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what}: not ready after {timeout_s:.0f} s")


class TorchServe:
    """torchserve --foreground in its own directory (logs, pid file) on 127.0.0.1 ports."""

    def __init__(self, work: Path, model_dir: Path, engine: str) -> None:
        self.work = work
        self.store = work / "model-store"
        self.store.mkdir(parents=True)
        self.port, self.mgmt_port, self.metrics_port = free_port(), free_port(), free_port()
        self.config = work / "config.properties"
        self.config.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{self.port}",
            f"management_address=http://127.0.0.1:{self.mgmt_port}",
            f"metrics_address=http://127.0.0.1:{self.metrics_port}",
            f"model_store={self.store}",
            "default_workers_per_model=1",
            "enable_metrics_api=false",
            "disable_token_authorization=true",
            "install_py_dep_per_model=false",
            "disable_system_metrics=true",
            f"load_models={MODEL_NAME}.mar",
            "models=" + json.dumps({MODEL_NAME: {"1.0": {
                "defaultVersion": True, "marName": f"{MODEL_NAME}.mar", "minWorkers": 1,
                "maxWorkers": 1, "batchSize": 32, "maxBatchDelay": 5, "responseTimeout": 120}}}),
            "",
        ]))
        # TorchServe logs every request (access log, metrics) at INFO by default; imgrec's access
        # log is off by default, so TorchServe logs warnings and errors only, to a file.
        self.log4j = work / "log4j2.xml"
        self.log4j.write_text(LOG4J2.format(log=work / "logs" / "torchserve.log"))
        # TMPDIR: torchserve keeps its pid file there, so --stop finds this instance only
        self.env = {**os.environ, **MALLOC, "TMPDIR": str(work),
                    "PATH": f"{TS_VENV / 'bin'}:{os.environ.get('PATH', '')}"}
        self.env.pop("PYTHONPATH", None)
        build_mar(model_dir, self.store, work, engine)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()

    def start(self) -> None:
        self.log = open(self.work / "torchserve.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(TS_VENV / "bin" / "torchserve"), "--start", "--foreground", "--ncs",
             "--disable-token-auth", "--model-store", str(self.store), "--ts-config",
             str(self.config), "--log-config", str(self.log4j)],
            env=self.env, cwd=self.work, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._worker_ready, self.proc, "torchserve", 180)
        self.pids.update(process_tree(self.proc.pid))
        names = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in sorted(self.pids)]
        print(f"torchserve process tree (CPU summed over all): {', '.join(names)}")

    def print_logs(self) -> None:
        for log in (self.work / "torchserve.out", self.work / "logs" / "torchserve.log"):
            if log.is_file():
                tail = log.read_text(errors="replace").splitlines()[-30:]
                print(f"--- {log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)

    def _worker_ready(self) -> bool:
        url = f"http://127.0.0.1:{self.mgmt_port}/models/{MODEL_NAME}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                desc = json.loads(r.read())
        except urllib.error.HTTPError:
            return False
        model = desc[0]
        if (model.get("batchSize"), model.get("maxBatchDelay")) != (32, 5):
            raise RuntimeError(f"torchserve did not take the batch settings: {model}")
        return any(w.get("status") == "READY" for w in model.get("workers", []))

    def stop(self) -> None:
        if self.proc is None:
            return
        self.pids.update(process_tree(self.proc.pid))
        subprocess.run([str(TS_VENV / "bin" / "torchserve"), "--stop"], env=self.env,
                       cwd=self.work, capture_output=True, timeout=90, check=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        deadline = time.monotonic() + 15
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            while time.monotonic() < deadline and any(_alive(p) for p in self.pids):
                time.sleep(0.2)
            deadline = time.monotonic() + 5
        if self.proc.poll() is None:
            self.proc.wait(10)
        self.log.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_imgrec(proc: subprocess.Popen[bytes]) -> None:
    pids = process_tree(proc.pid)
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)


def measure(label: str, port: int, path: str, root_pid: int, bodies: Path,
            seconds: float) -> list[Run]:
    wrk(port, 4, 2, bodies, BODY_COUNT, root_pid, "warm-up", path)
    runs = []
    for conc in CONCURRENCIES:
        run = wrk(port, conc, seconds, bodies, BODY_COUNT, root_pid, label, path)
        runs.append(run)
        print(table([run]).splitlines()[-1], flush=True)
    return runs


def median_at(runs: list[Run], label: str, conc: int, attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs
                             if r.server == label and r.concurrency == conc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setup", action="store_true", help=f"create {TS_VENV.name} if missing, "
                   "install TorchServe there, then run")
    p.add_argument("--setup-only", action="store_true", help="--setup, then exit")
    p.add_argument("--model-dir", default=str(ROOT / "models" / "fashion-mnist"))
    p.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    p.add_argument("--rounds", type=int, default=1, help="alternate the servers this many times "
                   "(ratios use the medians)")
    p.add_argument("--ts-engines", default="torch",
                   help="the engine(s) in TorchServe's handler, comma-separated: torch (eager "
                   "PyTorch, the default), onnxruntime (imgrec's own engine)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    ts_engines = [e.strip() for e in args.ts_engines.split(",") if e.strip()]
    if not ts_engines or set(ts_engines) - {"torch", "onnxruntime"}:
        p.error("--ts-engines takes torch and/or onnxruntime")
    if args.setup or args.setup_only:
        setup_venv()
        if args.setup_only:
            return 0
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    if shutil.which("java") is None:
        print("TorchServe needs Java 11+: apt-get install -y openjdk-17-jre-headless",
              file=sys.stderr)
        return 2
    if not (TS_VENV / "bin" / "torchserve").exists():
        print(f"{TS_VENV} has no torchserve: run with --setup first", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="imgrec-tscmp-"))
    ts_labels = {"torch": "TorchServe 0.12, eager PyTorch handler",
                 "onnxruntime": "TorchServe 0.12, ONNX Runtime handler"}
    im_label = "imgrec (batching, max 32)"
    runs: list[Run] = []
    try:
        model_dir = Path(args.model_dir)
        if not (model_dir / "card.json").is_file():
            model_dir = random_model(tmp, "fashion")
        bodies = tmp / "png28"
        make_bodies(bodies, BODY_COUNT, "png28")
        print(f"model: {model_dir}; {BODY_COUNT} distinct PNG uploads; {args.seconds:g} s per "
              f"point; {os.cpu_count()} cores\n", flush=True)
        for rnd in range(args.rounds):
            for engine in ts_engines:
                ts = TorchServe(tmp / f"torchserve-{rnd}-{engine}", model_dir, engine)
                try:
                    ts.start()
                    assert ts.proc is not None
                    path = f"/predictions/{MODEL_NAME}"
                    print(f"torchserve ({engine}) answer: "
                          f"{check_answer(ts.port, path, bodies)[:120]}...")
                    runs += measure(ts_labels[engine], ts.port, path, ts.proc.pid, bodies,
                                    args.seconds)
                except (RuntimeError, OSError, subprocess.SubprocessError):
                    ts.print_logs()
                    raise
                finally:
                    ts.stop()
            port = free_port()
            proc = start_server("imgrec", model_dir, port, {}, tmp)
            try:
                check_answer(port, "/predict", bodies)
                runs += measure(im_label, port, "/predict", proc.pid, bodies, args.seconds)
            finally:
                stop_imgrec(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n" + table(runs) + "\n")
    rps_im = median_at(runs, im_label, 64, "rps")
    p50_im = median_at(runs, im_label, 1, "p50_ms")
    summary: dict[str, dict[str, float]] = {}
    for engine in ts_engines:
        rps_ts = median_at(runs, ts_labels[engine], 64, "rps")
        p50_ts = median_at(runs, ts_labels[engine], 1, "p50_ms")
        ratio = rps_im / rps_ts if rps_ts else float("nan")
        summary[engine] = {"ratio_c64": ratio, "rps_c64_torchserve": rps_ts,
                           "p50_c1_ms_torchserve": p50_ts}
        print(f"vs TorchServe with the {engine} handler: concurrency 64: imgrec {rps_im:.0f} "
              f"req/s / TorchServe {rps_ts:.0f} req/s = {ratio:.2f}x (target >= 1.5x: "
              f"{'met' if ratio >= 1.5 else 'NOT met'}); concurrency 1 p50: imgrec "
              f"{p50_im:.2f} ms, TorchServe {p50_ts:.2f} ms")
    errors = sum(r.errors for r in runs)
    if errors:
        print(f"WARNING: {errors} failed requests; the figures above are not comparable")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "runs": [r.__dict__ for r in runs], "rps_c64_imgrec": rps_im,
            "p50_c1_ms_imgrec": p50_im, "torchserve": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
