"""What tracing costs: POST /predict with tracing off and with the OTLP exporter on, A/B
interleaved in one run (and, with --baseline-tree, a tree from before tracing and request ids
existed, to show what "off" costs).

Each arm is `imgrec serve` of the same model with the same settings, one at a time, in
alternating rounds (off, on, [baseline,] off, on, ...), so that whatever else the machine does
falls on all alike. "on" is OTEL_TRACES_EXPORTER=otlp over http/protobuf to a local OTLP
receiver (tests/helpers/otlp.py in a process of its own: it decodes every export, as a
collector does, and counts the spans), every request sampled (the default sampler; nothing sent
a traceparent), "on, 1/10 sampled" the same with
OTEL_TRACES_SAMPLER=parentbased_traceidratio and OTEL_TRACES_SAMPLER_ARG=0.1. IMGREC_ACCESS_LOG
is off in all arms. wrk sends bench/serve.py's distinct PNG
uploads. Prints the median per arm and concurrency, the ratios to "off", and the spans the
receiver got per request served. Asserts nothing.

    python bench/tracing.py --rounds 3
    python bench/tracing.py --micro     # CPU per request of the tracing code alone, in process
    git worktree add /tmp/before <commit>; python bench/tracing.py --baseline-tree /tmp/before
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ab_trees import serve, stop  # noqa: E402
from bench.serve import Run, free_port, make_bodies, wrk  # noqa: E402


def start_receiver(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "otlp.py"),
                             "--port", str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def micro(requests: int = 5000) -> None:
    """CPU per request of the request's edges (id, context, server span) and of a request's
    seven spans (server, read upload, decode, queue wait, forward, store write, its batch), in
    this process, with nothing else: off; on but not sampled; sampled, spans made and dropped;
    sampled, spans batched and encoded as the OTLP exporter encodes them (no network)."""
    import time

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    from app.api.request_middleware import finish_span, start
    from app.serving.request_context import CURRENT
    from app.serving.tracing import Tracing

    class Dropped(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class Encoded(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            encode_spans(spans).SerializeToString()  # type: ignore[arg-type]
            return SpanExportResult.SUCCESS

    def provider(sampler: object, processor: object) -> Tracing:
        p = TracerProvider(sampler=sampler)  # type: ignore[arg-type]
        p.add_span_processor(processor)  # type: ignore[arg-type]
        return Tracing(p)

    cases = [("off", Tracing()),
             ("on, not sampled", provider(ALWAYS_OFF, SimpleSpanProcessor(Dropped()))),
             ("on, spans made and dropped", provider(ALWAYS_ON, SimpleSpanProcessor(Dropped()))),
             ("on, spans batched and OTLP-encoded",
              provider(ALWAYS_ON, BatchSpanProcessor(Encoded(), max_queue_size=65536)))]
    print(f"# python bench/tracing.py --micro ({requests} requests each)")
    print("| tracing | CPU us per request |")
    print("|---|---|")
    for label, tracing in cases:
        def one(tracing: Tracing = tracing) -> None:
            ctx = start(tracing, None, "POST", (), {"http.request.method": "POST"})
            token = CURRENT.set(ctx)
            with tracing.span("read upload"):
                pass
            span = tracing.request_span()
            if span is not None:
                now = time.time_ns()
                tracing.child(span, "decode", now, now + 1000, {"imgrec.image.index": 0})
                batch = tracing.start_batch([span.get_span_context()], 1, {"m": "x"})
                assert batch is not None
                batch[1].end_ns = batch[1].store_start_ns = batch[1].store_end_ns = now
                batch[0].end()
                tracing.request_batches(span, now, [batch[1]])
            finish_span(ctx, "POST /predict", None, {"http.response.status_code": 200})
            CURRENT.reset(token)

        for _ in range(500):
            one()
        started = time.process_time()
        for _ in range(requests):
            one()
        tracing.force_flush()
        used = time.process_time() - started
        print(f"| {label} | {used / requests * 1e6:.1f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=str(ROOT / "models" / "fashion-mnist"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0, help="per wrk run")
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--baseline-tree", help="also serve this source tree (tracing off)")
    p.add_argument("--micro", action="store_true", help="only the in-process CPU per request")
    p.add_argument("--arms", help="only these arms, comma-separated (off is always run)")
    args = p.parse_args()
    if args.micro:
        micro()
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    receiver_port = free_port()
    on = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
          "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}"}
    # head sampling, as a busy service would trace: one request in ten (the rest cost a
    # sampling decision and an unrecorded span)
    tenth = {**on, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
             "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    arms: list[tuple[str, Path, dict[str, str]]] = [("off", ROOT, {}), ("on", ROOT, on),
                                                    ("on, 1/10 sampled", ROOT, tenth)]
    if args.baseline_tree:
        arms.append(("baseline", Path(args.baseline_tree).resolve(), {}))
    if args.arms:
        wanted = {"off", *args.arms.split(",")}
        arms = [a for a in arms if a[0] in wanted]
    runs: dict[tuple[str, int], list[Run]] = {}
    served_on = served_sampled = 0
    receiver = start_receiver(receiver_port)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bodies = tmp / "bodies"
        count = 256
        make_bodies(bodies, count, "png")
        for _ in range(args.rounds):
            for name, tree, extra in arms:
                proc, port = serve(tree, Path(args.model_dir), tmp, extra)
                try:
                    warm = wrk(port, 16, 2, bodies, count, proc.pid, name)
                    for c in levels:
                        run = wrk(port, c, args.seconds, bodies, count, proc.pid, name)
                        runs.setdefault((name, c), []).append(run)
                        if name == "on":
                            served_on += run.requests
                        elif extra:
                            served_sampled += run.requests
                    if name == "on":
                        served_on += warm.requests + 1  # and the readiness probe's
                    elif extra:
                        served_sampled += warm.requests + 1
                finally:
                    stop(proc)  # its exporter flushes what it holds on the way out
    receiver.terminate()
    out, _ = receiver.communicate(timeout=60)
    spans = int(out.split("spans ")[1].split()[0])
    print(f"# python bench/tracing.py {' '.join(sys.argv[1:])}")
    print(f"# medians of {args.rounds} interleaved rounds, {args.seconds:g} s per wrk run; "
          f"the receiver got {spans} spans for {served_on} requests served with every one "
          f"sampled and {served_sampled} with one in ten")
    print("| arm | conc. | req/s | p50 ms | p99 ms | server CPU ms/req (min-max) | errors |")
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        for name, _, _ in arms:
            rs = runs[(name, c)]
            print(f"| {name} | {c} | {statistics.median(r.rps for r in rs):.0f} | "
                  f"{statistics.median(r.p50_ms for r in rs):.2f} | "
                  f"{statistics.median(r.p99_ms for r in rs):.2f} | "
                  f"{statistics.median(r.cpu_ms_per_req for r in rs):.2f} "
                  f"({min(r.cpu_ms_per_req for r in rs):.2f}-"
                  f"{max(r.cpu_ms_per_req for r in rs):.2f}) | "
                  f"{sum(r.errors for r in rs)} |")
        off = statistics.median(r.rps for r in runs[("off", c)])
        off_cpu = statistics.median(r.cpu_ms_per_req for r in runs[("off", c)])
        for name, _, _ in [a for a in arms if a[0] != "off"]:
            rps = statistics.median(r.rps for r in runs[(name, c)])
            cpu = statistics.median(r.cpu_ms_per_req for r in runs[(name, c)])
            print(f"| {name} / off | {c} | {rps / off:.2f} | | | {cpu / off_cpu:.2f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
