"""Open Inference Protocol paths against /predict, on the same load, in one run: prints figures,
asserts nothing.

One `imgrec serve` (HTTP and gRPC in one process, the shipped model, ONNX Runtime), the same
distinct 28x28 PNG uploads (Fashion-MNIST test images when installed), one image per request,
at one concurrency (64 by default), each path measured in turn and the rounds interleaved so
that other load on the machine falls on every path alike:

* ``/predict``: multipart upload (top 5 labels), wrk + bench/wrk_multipart.lua;
* OIP REST, binary: ``POST /v2/models/{name}/infer`` with the binary tensor data extension
  (what tritonclient.http sends: a JSON header, then the length-prefixed PNG), probabilities
  answered in binary; wrk + bench/wrk_oip.lua with pre-built bodies;
* OIP REST, JSON: the same request as JSON (the PNG base64, probabilities as JSON numbers);
* OIP gRPC: ``ModelInfer`` with raw_input_contents (what tritonclient.grpc sends), from a
  multi-process asyncio load generator (pre-built messages, one channel per process), so that
  one Python client process is not the bottleneck; its CPU is reported like wrk's.

    python bench/oip.py                        # 64 concurrent, 8 s per run, 2 rounds
    python bench/oip.py --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import multiprocessing as mp
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import (  # noqa: E402
    Run,
    free_port,
    multipart_body,
    start_server,
    table,
    tree_cpu,
    wrk,
)


def pngs(count: int) -> list[bytes]:
    try:
        from app.training.data import load_fashion_mnist

        images = load_fashion_mnist("fashion-mnist").test.images[:count, 0].numpy()
    except (ValueError, OSError):
        images = np.random.default_rng(0).integers(0, 256, (count, 28, 28), np.uint8)
    out = []
    for arr in images:
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_bodies(tmp: Path, images: list[bytes]) -> dict[str, Path]:
    dirs = {k: tmp / k for k in ("predict", "binary", "json")}
    for d in dirs.values():
        d.mkdir(parents=True)
    for k, png in enumerate(images, 1):
        (dirs["predict"] / f"{k}.body").write_bytes(multipart_body(png, f"{k}.png"))
        header = orjson.dumps({
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": 4 + len(png)}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]})
        (dirs["binary"] / f"{k}.body").write_bytes(header + struct.pack("<I", len(png)) + png)
        (dirs["binary"] / f"{k}.hlen").write_text(str(len(header)))
        (dirs["json"] / f"{k}.body").write_bytes(orjson.dumps({
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(png).decode()]}],
            "outputs": [{"name": "probabilities"}]}))
    return dirs


# -- the gRPC load generator --------------------------------------------------------------------
def _grpc_worker(target: str, model: str, images: list[bytes], concurrency: int,
                 seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    requests = []
    for png in images:
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="image", datatype="BYTES", shape=[1])
        req.outputs.add(name="probabilities")
        req.raw_input_contents.append(struct.pack("<I", len(png)) + png)
        requests.append(req)

    async def run() -> tuple[int, int, list[float]]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            end = time.perf_counter() + seconds
            latencies: list[float] = []
            errors = 0

            async def loop(offset: int) -> None:
                nonlocal errors
                i = offset
                while time.perf_counter() < end:
                    i = (i + 1) % len(requests)
                    t0 = time.perf_counter()
                    try:
                        await stub.ModelInfer(requests[i], timeout=30)
                        latencies.append(time.perf_counter() - t0)
                    except grpc.aio.AioRpcError:
                        errors += 1

            await asyncio.gather(*(loop(k * 97) for k in range(concurrency)))
            return len(latencies), errors, latencies

    n, errors, latencies = asyncio.run(run())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put((n, errors, latencies, usage.ru_utime + usage.ru_stime))


def grpc_load(port: int, model: str, images: list[bytes], concurrency: int, seconds: float,
              pid: int, label: str, processes: int) -> Run:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    shares = [concurrency // processes + (k < concurrency % processes)
              for k in range(processes)]
    workers = [ctx.Process(target=_grpc_worker, args=(f"127.0.0.1:{port}", model,
                                                       images[k::processes], c, seconds, queue))
               for k, c in enumerate(shares)]
    before = tree_cpu(pid)
    for w in workers:
        w.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join(30)
    after = tree_cpu(pid)
    server_cpu = sum(cpu - before.get(p, 0.0) for p, cpu in after.items())
    total = sum(r[0] for r in results)
    latencies = np.concatenate([np.asarray(r[2]) for r in results]) * 1000
    # the rate over the timed window (process start-up is outside it)
    rps = total / seconds
    n = max(total, 1)
    return Run(label, concurrency, rps, float(np.percentile(latencies, 50)),
               float(np.percentile(latencies, 99)), 1000 * server_cpu / n,
               1000 * sum(r[3] for r in results) / n, sum(r[1] for r in results), total)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", default=str(ROOT / "models" / "fashion-mnist"))
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0, help="per run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all paths")
    p.add_argument("--grpc-processes", type=int, default=2)
    p.add_argument("--images", type=int, default=2000)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    model_dir = Path(args.model_dir)
    model = orjson.loads((model_dir / "card.json").read_bytes())["name"]
    tmp = Path(tempfile.mkdtemp(prefix="imgrec-oip-bench-"))
    try:
        images = pngs(args.images)
        dirs = write_bodies(tmp, images)
        port, grpc_port = free_port(), free_port()
        proc = start_server("imgrec", model_dir, port, {"IMGREC_GRPC_PORT": str(grpc_port)},
                            tmp)
        infer = f"/v2/models/{model}/infer"
        paths = {
            "/predict (multipart)": lambda label, s: wrk(
                port, args.concurrency, s, dirs["predict"], len(images), proc.pid, label),
            "OIP REST binary": lambda label, s: wrk(
                port, args.concurrency, s, dirs["binary"], len(images), proc.pid, label,
                path=infer, script="wrk_oip.lua",
                env_extra={"BENCH_CTYPE": "application/octet-stream"}),
            "OIP REST JSON": lambda label, s: wrk(
                port, args.concurrency, s, dirs["json"], len(images), proc.pid, label,
                path=infer, script="wrk_oip.lua"),
            "OIP gRPC": lambda label, s: grpc_load(
                grpc_port, model, images, args.concurrency, s, proc.pid, label,
                args.grpc_processes),
        }
        runs: dict[str, list[Run]] = {k: [] for k in paths}
        try:
            for label, run in paths.items():  # warm every path up
                run(label, 2)
            for _ in range(args.rounds):
                for label, run in paths.items():
                    r = run(label, args.seconds)
                    runs[label].append(r)
                    print(table([r]).splitlines()[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
        print("\n" + table([r for rs in runs.values() for r in rs]) + "\n")
        base = sum(r.rps for r in runs["/predict (multipart)"])
        base_cpu = sum(r.cpu_ms_per_req for r in runs["/predict (multipart)"])
        for label, rs in runs.items():
            print(f"{label}: throughput {sum(r.rps for r in rs) / base:.2f}x /predict's, "
                  f"server CPU per request {sum(r.cpu_ms_per_req for r in rs) / base_cpu:.2f}x")
        print(f"\nmachine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the "
              "end (shared with other work)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
