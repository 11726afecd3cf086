"""Traces against a real OTLP receiver (tests/helpers/otlp.py) that the SDK's own exporter sends
to: a server span per request continuing the client's traceparent, its children, the batch span
linked to every request it served, the same on the fast path, FastAPI's routes and the Open
Inference Protocol over REST and gRPC; and the OTEL_* configuration."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.apps import Gate, LiveServer, running, upload
from helpers.images import png_bytes
from helpers.otlp import OtlpReceiver, Span
from helpers.waits import until

from app.main import create_app
from app.serve.logs import handler
from app.serving.request_context import well_formed
from app.serving.tracing import TracingError, check_env, describe

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STEPS = {"read upload", "decode", "queue wait", "forward", "store write"}


@pytest.fixture()
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def trace_to(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver,
             protocol: str = "http/protobuf") -> None:
    """The OTEL_* variables an operator sets, pointing at the test's receiver."""
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "imgrec-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # ms: the test need not wait 5 s


def server_span(spans: list[Span], request_id: str) -> Span | None:
    return next((s for s in spans if s.kind == "server"
                 and s.attributes.get("imgrec.request_id") == request_id), None)


def children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent_span_id == parent.span_id
            and s.trace_id == parent.trace_id]


def complete(request_id: str, steps: set[str] = STEPS) -> Callable[[list[Span]], bool]:
    """The request's server span and each of its steps have arrived."""
    def check(spans: list[Span]) -> bool:
        server = server_span(spans, request_id)
        return server is not None and steps <= {c.name for c in children(spans, server)}
    return check


def batch_of(spans: list[Span], forward: Span) -> Span:
    (link,) = forward.links
    (batch,) = [s for s in spans if (s.trace_id, s.span_id) == link]
    return batch


async def test_predict_continues_the_trace_with_a_span_per_step(
        tiny_settings: Callable[..., object], receiver: OtlpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    trace_to(monkeypatch, receiver)
    async with running(create_app(tiny_settings())) as c:
        r = await c.post("/predict", files=upload(1, 2),
                         headers={"traceparent": TRACEPARENT, "X-Request-ID": "client-7.a_b"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-7.a_b"
    spans = receiver.wait_for(complete("client-7.a_b"))
    server = server_span(spans, "client-7.a_b")
    assert server is not None
    # the client's trace continues: same trace id, parented by the client's span
    assert (server.trace_id, server.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert server.name == "POST /predict" and server.status == 0
    assert server.attributes["http.route"] == "/predict"
    assert server.attributes["http.response.status_code"] == 200
    assert server.resource["service.name"] == "imgrec-test"
    steps = children(spans, server)
    names = sorted(s.name for s in steps)
    assert names.count("decode") == 2 and names.count("read upload") == 1
    for s in steps:  # within the request, in order: read, decode, queue, forward, store
        assert server.start_ns <= s.start_ns <= s.end_ns <= server.end_ns, s.name
    by_name = {s.name: s for s in steps}
    assert by_name["read upload"].attributes["imgrec.files"] == 2
    assert by_name["read upload"].end_ns <= min(s.start_ns for s in steps if s.name == "decode")
    assert by_name["queue wait"].end_ns <= by_name["forward"].start_ns
    assert by_name["forward"].end_ns <= by_name["store write"].start_ns
    assert by_name["store write"].attributes["imgrec.stored"] is True
    # the forward pass links to its batch, a trace of its own linked back to this request
    batch = batch_of(spans, by_name["forward"])
    assert batch.name == "batch" and batch.trace_id != TRACE_ID and batch.parent_span_id == ""
    assert (server.trace_id, server.span_id) in batch.links
    assert batch.attributes["imgrec.batch.size"] == 2


async def test_one_batch_span_links_every_request_it_served(
        tiny_settings: Callable[..., object], receiver: OtlpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    trace_to(monkeypatch, receiver)
    gate = Gate(monkeypatch)
    app = create_app(tiny_settings())
    async with running(app) as c:
        gate.close()
        first = asyncio.create_task(c.post("/predict", files=upload(10),
                                           headers={"X-Request-ID": "held"}))
        await until(gate.reached.is_set, "the first batch at the gate")
        later = [asyncio.create_task(c.post("/predict", files=upload(11 + i),
                                            headers={"X-Request-ID": f"joined-{i}"}))
                 for i in range(3)]
        await until(lambda: app.state.service.batcher.depth == 3, "three requests queued")
        gate.open.set()
        answers = await asyncio.gather(first, *later)
    assert [a.status_code for a in answers] == [200] * 4
    ids = [f"joined-{i}" for i in range(3)]
    spans = receiver.wait_for(lambda s: all(complete(i)(s) for i in [*ids, "held"]))
    servers = [server_span(spans, i) for i in ids]
    forwards = [next(c for c in children(spans, s) if c.name == "forward")
                for s in servers if s is not None]
    batches = {batch_of(spans, f).span_id for f in forwards}
    assert len(batches) == 1, "the three queued requests ran in one forward pass"
    (batch,) = [s for s in spans if s.span_id in batches]
    assert batch.attributes["imgrec.batch.size"] == 3
    assert batch.attributes["imgrec.batch.requests"] == 3
    assert sorted(batch.links) == sorted((s.trace_id, s.span_id) for s in servers if s)
    held = server_span(spans, "held")
    assert held is not None and (held.trace_id, held.span_id) not in batch.links


async def test_the_fast_path_and_fastapi_routes_trace_alike(
        tiny_settings: Callable[..., object], receiver: OtlpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    trace_to(monkeypatch, receiver)
    buf = io.StringIO()
    log_handler = handler("json", buf)
    root = logging.getLogger()
    root.addHandler(log_handler)
    try:
        async with running(create_app(tiny_settings(access_log=True))) as c:
            embed = await c.post("/embed", files=upload(3))  # the fast path
            search = await c.post("/search?k=1", files=upload(4))  # FastAPI's routing
            lookup = await c.get("/search", params={"id": search.json()["results"][0]["id"]})
    finally:
        root.removeHandler(log_handler)
    assert [embed.status_code, search.status_code, lookup.status_code] == [200] * 3
    ids = [embed.headers["x-request-id"], search.headers["x-request-id"],
           lookup.headers["x-request-id"]]
    spans = receiver.wait_for(lambda s: complete(ids[0])(s)
                              and complete(ids[1], STEPS | {"search"})(s)
                              and complete(ids[2], {"search"})(s))
    e, s = server_span(spans, ids[0]), server_span(spans, ids[1])
    assert e is not None and s is not None
    assert {c.name for c in children(spans, e)} == STEPS
    assert {c.name for c in children(spans, s)} == STEPS | {"search"}
    assert (e.name, s.name) == ("POST /embed", "POST /search")
    # every access line carries the request's id and its trace's, as the span does
    access = [json.loads(line) for line in buf.getvalue().splitlines()
              if json.loads(line)["logger"] == "imgrec.access"]
    by_id = {a["request_id"]: a for a in access}
    assert by_id[ids[0]]["trace_id"] == e.trace_id and by_id[ids[0]]["route"] == "/embed"
    assert by_id[ids[1]]["trace_id"] == s.trace_id and by_id[ids[1]]["status"] == 200


def test_oip_rest_and_grpc_trace_like_predict(
        served_model_dir: Path, tmp_path: Path, receiver: OtlpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import grpc
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    trace_to(monkeypatch, receiver, protocol="grpc")  # and the OTLP/gRPC exporter
    images = np.array([[png_bytes(5)]], dtype=np.object_)
    with LiveServer(served_model_dir, tmp_path) as live:
        rest = httpclient.InferenceServerClient(live.url)
        inp = httpclient.InferInput("image", [1, 1], "BYTES")
        inp.set_data_from_numpy(images)
        rest.infer("test-fashion-small", [inp], headers={"traceparent": TRACEPARENT,
                                                    "x-request-id": "rest-1"})
        rpc = grpcclient.InferenceServerClient(live.grpc_url)
        ginp = grpcclient.InferInput("image", [1, 1], "BYTES")
        ginp.set_data_from_numpy(images)
        rpc.infer("test-fashion-small", [ginp], headers={"traceparent": TRACEPARENT,
                                                    "x-request-id": "grpc-1"})
        rpc.close()
        with grpc.insecure_channel(live.grpc_url) as channel:  # the id in initial metadata
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            _, call = stub.ServerLive.with_call(pb.ServerLiveRequest(),
                                                metadata=[("x-request-id", "live-1")])
            assert ("x-request-id", "live-1") in call.initial_metadata()
            _, call = stub.ServerLive.with_call(pb.ServerLiveRequest(),
                                                metadata=[("x-request-id", "not ok")])
            (new,) = [v for k, v in call.initial_metadata() if k == "x-request-id"]
            assert well_formed(new) and new != "not ok"
    spans = receiver.wait_for(lambda s: complete("rest-1")(s)
                              and complete("grpc-1", STEPS - {"read upload"})(s))
    rest_span, grpc_span = server_span(spans, "rest-1"), server_span(spans, "grpc-1")
    assert rest_span is not None and grpc_span is not None
    assert rest_span.name == "POST /v2/models/{name}/infer"
    assert grpc_span.name == "inference.GRPCInferenceService/ModelInfer"
    assert grpc_span.attributes["rpc.system"] == "grpc"
    for span in (rest_span, grpc_span):
        assert (span.trace_id, span.parent_span_id) == (TRACE_ID, PARENT_ID)
        forward = next(c for c in children(spans, span) if c.name == "forward")
        assert (span.trace_id, span.span_id) in batch_of(spans, forward).links


async def test_an_unsampled_request_makes_no_spans(
        tiny_settings: Callable[..., object], receiver: OtlpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    trace_to(monkeypatch, receiver)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    async with running(create_app(tiny_settings())) as c:
        # the client's trace is not sampled (flags 00): neither is ours, nor its batch
        unsampled = await c.post("/predict", files=upload(6),
                                 headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
        sampled = await c.post("/predict", files=upload(7), headers={"X-Request-ID": "yes"})
    assert unsampled.status_code == sampled.status_code == 200
    spans = receiver.wait_for(complete("yes"))
    assert all(s.trace_id != TRACE_ID for s in spans)
    assert len([s for s in spans if s.name == "batch"]) == 1


def test_the_otel_variables_configure_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_env({}) == []  # nothing configured: off
    assert check_env({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert check_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == ["otlp"]
    assert check_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []
    assert check_env({"OTEL_TRACES_EXPORTER": "console,otlp"}) == ["console", "otlp"]
    with pytest.raises(TracingError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"):
        check_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(TracingError, match="OTEL_TRACES_EXPORTER='nonesuch'"):
        check_env({"OTEL_TRACES_EXPORTER": "nonesuch"})
    line = describe({"OTEL_TRACES_EXPORTER": "otlp",
                     "OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:pw@collector:4318",
                     "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cr3t"})
    assert line == ("tracing on: otlp (http/protobuf) to https://collector:4318; "
                    "sampler parentbased_always_on")
    assert "s3cr3t" not in line and "pw" not in line


def test_without_an_exporter_the_sdk_is_never_imported(served_model_dir: Path,
                                                        tmp_path: Path) -> None:
    """Off costs nothing: a request is served and neither the SDK nor an exporter is loaded
    (so a plain install without the [trace] extra serves; tests/deploy/test_wheel.py serves
    from one)."""
    script = f"""
import asyncio, sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from helpers.apps import running, upload
from helpers.settings import make_settings
from app.main import create_app
from pathlib import Path

async def main():
    app = create_app(make_settings(Path({str(served_model_dir)!r}), Path({str(tmp_path)!r})))
    async with running(app) as c:
        r = await c.post("/predict", files=upload(1))
        assert r.status_code == 200 and r.headers["x-request-id"]
asyncio.run(main())
loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk",
                                                         "opentelemetry.exporter")))
print("loaded:", loaded)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded: []" in out.stdout
