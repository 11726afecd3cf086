"""The Open Inference Protocol (KServe v2) with the real clients: tritonclient's HTTP client
(binary tensor data by default, JSON on request) and its gRPC client, against a real uvicorn
server with the gRPC server in the same process; answers compared with /predict's and /embed's.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
import tritonclient.http.aio as thttp_aio
from helpers.apps import Gate, LiveServer, metric, running
from helpers.daemons import LOOPBACK, free_port, wait_until
from helpers.images import png_bytes
from helpers.models import LABELS
from helpers.settings import make_settings
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from app.main import create_app
from app.serving.service import Service

MODEL = "test-fashion-small"
CLASSES = len(LABELS)


@pytest.fixture(scope="module")
def live(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[LiveServer]:
    with LiveServer(served_model_dir, tmp_path_factory.mktemp("oip")) as server:
        yield server


@pytest.fixture()
def http(live: LiveServer) -> Iterator[thttp.InferenceServerClient]:
    client = thttp.InferenceServerClient(live.url)
    yield client
    client.close()


@pytest.fixture()
def rpc(live: LiveServer) -> Iterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(live.grpc_url)
    yield client
    client.close()


def rest(live: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=f"http://{live.url}", timeout=30)


def images_tensor(blobs: list[bytes], shape: list[int] | None = None) -> np.ndarray:
    return np.array(blobs, dtype=np.object_).reshape(shape or [len(blobs)])


def http_image_input(blobs: list[bytes], binary: bool = True,
                     shape: list[int] | None = None) -> thttp.InferInput:
    arr = images_tensor(blobs, shape)
    return thttp.InferInput("image", list(arr.shape), "BYTES").set_data_from_numpy(
        arr, binary_data=binary)


def grpc_image_input(blobs: list[bytes]) -> tgrpc.InferInput:
    arr = images_tensor(blobs)
    return tgrpc.InferInput("image", list(arr.shape), "BYTES").set_data_from_numpy(arr)


def predict_reference(live: LiveServer, blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray,
                                                                      list[str]]:
    """/predict's full probability vectors, embeddings and ids for the same uploads."""
    with rest(live) as c:
        r = c.post("/predict", params={"top_k": CLASSES, "embedding": "true"},
                   files=[("file", (f"{i}.png", b)) for i, b in enumerate(blobs)])
    assert r.status_code == 200, r.text
    probs = np.zeros((len(blobs), CLASSES), np.float32)
    for row, res in enumerate(r.json()["results"]):
        for item in res["labels"]:
            probs[row, item["index"]] = item["score"]
    emb = np.array([res["embedding"] for res in r.json()["results"]], np.float32)
    return probs, emb, [res["id"] for res in r.json()["results"]]


def pixels_of(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("L"))[None]


def assert_rest_error(e: pytest.ExceptionInfo[InferenceServerException], status: int,
                      fragment: str) -> None:
    assert e.value.status() == str(status), (e.value.status(), e.value.message())
    assert fragment in e.value.message(), e.value.message()


def assert_grpc_error(e: pytest.ExceptionInfo[InferenceServerException],
                      code: grpc.StatusCode, fragment: str) -> None:
    assert e.value.status() == str(code), (e.value.status(), e.value.message())
    assert fragment in e.value.message(), e.value.message()


# -- health and metadata --------------------------------------------------------------------------
def test_health_and_metadata_over_http(http: thttp.InferenceServerClient,
                                       live: LiveServer) -> None:
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready(MODEL) and http.is_model_ready(MODEL, "0")
    assert not http.is_model_ready("no-such-model")
    assert not http.is_model_ready(MODEL, "7")
    server = http.get_server_metadata()
    assert server["name"] == "imgrec"
    assert set(server["extensions"]) >= {"binary_tensor_data", "classification"}
    for version in ("", "0"):
        meta = http.get_model_metadata(MODEL, version)
        assert meta["name"] == MODEL and meta["versions"] == ["0"]
        assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
            "image": ("BYTES", [-1, 1]), "pixels": ("UINT8", [-1, 1, 28, 28])}
        assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
            "probabilities": ("FP32", [-1, CLASSES]), "embedding": ("FP32", [-1, 256])}
    with pytest.raises(InferenceServerException) as e:
        http.get_model_metadata("no-such-model")
    assert_rest_error(e, 404, "unknown model 'no-such-model'")
    with pytest.raises(InferenceServerException) as e:
        http.get_model_metadata(MODEL, "7")
    assert_rest_error(e, 404, "unknown version '7'")
    with rest(live) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/models/test-fashion-small/versions/0/ready").json() == {
            "name": MODEL, "ready": True}


def test_health_and_metadata_over_grpc(rpc: tgrpc.InferenceServerClient) -> None:
    assert rpc.is_server_live() and rpc.is_server_ready()
    assert rpc.is_model_ready(MODEL) and rpc.is_model_ready(MODEL, "0")
    server = rpc.get_server_metadata()
    assert server.name == "imgrec" and "classification" in server.extensions
    meta = rpc.get_model_metadata(MODEL, "0")
    assert meta.versions == ["0"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("image", "BYTES", [-1, 1]), ("pixels", "UINT8", [-1, 1, 28, 28])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", [-1, CLASSES]), ("embedding", "FP32", [-1, 256])]
    for call in (lambda: rpc.get_model_metadata("nope"), lambda: rpc.is_model_ready("nope"),
                 lambda: rpc.get_model_metadata(MODEL, "7")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert_grpc_error(e, grpc.StatusCode.NOT_FOUND, "unknown")


# -- inference over HTTP ---------------------------------------------------------------------------
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "base64-json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_http_infer_equals_predict_and_embed(live: LiveServer, http: thttp.InferenceServerClient,
                                             binary_in: bool, binary_out: bool) -> None:
    blobs = [png_bytes(100 + i) for i in range(3)]
    probs, emb, ids = predict_reference(live, blobs)
    outputs = [thttp.InferRequestedOutput("probabilities", binary_data=binary_out),
               thttp.InferRequestedOutput("embedding", binary_data=binary_out)]
    if binary_in:
        result = http.infer(MODEL, [http_image_input(blobs)], outputs=outputs, request_id="r1")
        response = result.get_response()
    else:  # tritonclient only sends UTF-8 strings as JSON BYTES: base64 by hand
        body = {"id": "r1", "inputs": [{
            "name": "image", "datatype": "BYTES", "shape": [3], "parameters": {
                "content_type": "base64"},
            "data": [base64.b64encode(b).decode() for b in blobs]}],
            "outputs": [{"name": n, "parameters": {"binary_data": binary_out}}
                        for n in ("probabilities", "embedding")]}
        with rest(live) as c:
            r = c.post(f"/v2/models/{MODEL}/infer", json=body)
        assert r.status_code == 200, r.text
        result = thttp.InferResult.from_response_body(
            r.content, header_length=r.headers.get("inference-header-content-length"))
        response = result.get_response()
    assert response["id"] == "r1" and response["model_name"] == MODEL
    assert response["model_version"] == "0"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out
    p, e = result.as_numpy("probabilities"), result.as_numpy("embedding")
    assert p.dtype == np.float32 and p.shape == (3, CLASSES)
    np.testing.assert_allclose(p, probs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(e, emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    # the vectors were stored like /embed's: GET /embed finds them by the images' ids
    with rest(live) as c:
        found = c.get("/embed", params={"id": ids}).json()["results"]
    assert [f["id"] for f in found] == [hashlib.sha256(b).hexdigest() for b in blobs]
    np.testing.assert_allclose(np.array([f["embedding"] for f in found]), e, rtol=1e-6)


def test_http_all_outputs_by_default_shapes_and_versions_path(
        live: LiveServer, http: thttp.InferenceServerClient) -> None:
    blobs = [png_bytes(7), png_bytes(8)]
    probs, emb, _ = predict_reference(live, blobs)
    # [N, 1] shape, no outputs named (all of them, as JSON), the versions path
    result = http.infer(MODEL, [http_image_input(blobs, shape=[2, 1])], model_version="0")
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["probabilities", "embedding"]
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.as_numpy("embedding"), emb, rtol=1e-5, atol=1e-6)
    # one output only, compressed request and response requested
    one = http.infer(MODEL, [http_image_input(blobs)],
                     outputs=[thttp.InferRequestedOutput("embedding")],
                     request_compression_algorithm="gzip",
                     response_compression_algorithm="gzip")
    assert [o["name"] for o in one.get_response()["outputs"]] == ["embedding"]
    np.testing.assert_allclose(one.as_numpy("embedding"), emb, rtol=1e-5, atol=1e-6)


def test_http_classification_extension(live: LiveServer,
                                       http: thttp.InferenceServerClient) -> None:
    blobs = [png_bytes(20), png_bytes(21)]
    probs, _, _ = predict_reference(live, blobs)
    for binary in (True, False):
        result = http.infer(MODEL, [http_image_input(blobs)], outputs=[
            thttp.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)])
        classes = result.as_numpy("probabilities")
        assert classes.shape == (2, 3)
        for row in range(2):
            best = np.argsort(-probs[row], kind="stable")[:3]
            parsed = [c.decode().split(":") if isinstance(c, bytes) else c.split(":")
                      for c in classes[row]]
            assert [int(i) for _, i, _ in parsed] == list(best)
            assert [label for _, _, label in parsed] == [LABELS[i] for i in best]
            np.testing.assert_allclose([float(s) for s, _, _ in parsed], probs[row, best],
                                       rtol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_pixels_input_equals_the_encoded_image(live: LiveServer,
                                                    http: thttp.InferenceServerClient,
                                                    binary: bool) -> None:
    blobs = [png_bytes(30), png_bytes(31)]
    probs, emb, _ = predict_reference(live, blobs)
    pixels = np.stack([pixels_of(b) for b in blobs])  # (2, 1, 28, 28) uint8
    inp = thttp.InferInput("pixels", list(pixels.shape), "UINT8").set_data_from_numpy(
        pixels, binary_data=binary)
    result = http.infer(MODEL, [inp], outputs=[
        thttp.InferRequestedOutput("probabilities", binary_data=binary),
        thttp.InferRequestedOutput("embedding", binary_data=binary)])
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.as_numpy("embedding"), emb, rtol=1e-5, atol=1e-6)
    # stored under the sha256 of each image's pixel bytes
    pid = hashlib.sha256(pixels[0].tobytes()).hexdigest()
    with rest(live) as c:
        assert c.get("/embed", params={"id": pid}).status_code == 200


# -- inference over gRPC ---------------------------------------------------------------------------
def test_grpc_infer_classification_and_pixels(live: LiveServer,
                                              rpc: tgrpc.InferenceServerClient) -> None:
    blobs = [png_bytes(40 + i) for i in range(3)]
    probs, emb, ids = predict_reference(live, blobs)
    result = rpc.infer(MODEL, [grpc_image_input(blobs)], request_id="g1", outputs=[
        tgrpc.InferRequestedOutput("probabilities"), tgrpc.InferRequestedOutput("embedding")])
    assert result.get_response().id == "g1"
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.as_numpy("embedding"), emb, rtol=1e-5, atol=1e-6)
    with rest(live) as c:
        assert c.get("/embed", params={"id": ids}).status_code == 200
    # classification, the versions field, all outputs by default
    top = rpc.infer(MODEL, [grpc_image_input(blobs)], model_version="0",
                    outputs=[tgrpc.InferRequestedOutput("probabilities", class_count=2)])
    classes = top.as_numpy("probabilities")
    assert classes.shape == (3, 2)
    for row in range(3):
        best = np.argsort(-probs[row], kind="stable")[:2]
        assert [int(c.decode().split(":")[1]) for c in classes[row]] == list(best)
        assert [c.decode().split(":")[2] for c in classes[row]] == [LABELS[i] for i in best]
    pixels = np.stack([pixels_of(b) for b in blobs])
    inp = tgrpc.InferInput("pixels", list(pixels.shape), "UINT8").set_data_from_numpy(pixels)
    every = rpc.infer(MODEL, [inp])
    assert [o.name for o in every.get_response().outputs] == ["probabilities", "embedding"]
    np.testing.assert_allclose(every.as_numpy("probabilities"), probs, rtol=1e-6, atol=1e-7)


def test_grpc_typed_contents_instead_of_raw(live: LiveServer) -> None:
    """Clients other than tritonclient may fill InferTensorContents instead of raw bytes."""
    blobs = [png_bytes(50)]
    probs, _, _ = predict_reference(live, blobs)
    pixels = pixels_of(blobs[0])[None]
    with grpc.insecure_channel(live.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for tensor in (
            pb.ModelInferRequest.InferInputTensor(
                name="image", datatype="BYTES", shape=[1],
                contents=pb.InferTensorContents(bytes_contents=blobs)),
            pb.ModelInferRequest.InferInputTensor(
                name="pixels", datatype="UINT8", shape=list(pixels.shape),
                contents=pb.InferTensorContents(uint_contents=pixels.reshape(-1).tolist())),
        ):
            response = stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[tensor]))
            got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, CLASSES)
            np.testing.assert_allclose(got, probs, rtol=1e-6, atol=1e-7)


# -- errors ----------------------------------------------------------------------------------------
def test_http_errors_are_the_protocols(live: LiveServer,
                                       http: thttp.InferenceServerClient) -> None:
    good = [http_image_input([png_bytes(1)])]
    cases: list[tuple[Any, int, str]] = [
        (lambda: http.infer("nope", good), 404, "unknown model 'nope'"),
        (lambda: http.infer(MODEL, good, model_version="9"), 404, "unknown version '9'"),
        (lambda: http.infer(MODEL, [http_image_input([b"not an image"])]), 400,
         "unsupported_image"),
        (lambda: http.infer(MODEL, [http_image_input([png_bytes(1)] * 40)]), 400,
         "at most 32"),
        (lambda: http.infer(MODEL, good, outputs=[thttp.InferRequestedOutput("logits")]), 400,
         "unknown output 'logits'"),
        (lambda: http.infer(MODEL, good, outputs=[
            thttp.InferRequestedOutput("embedding", class_count=2)]), 400,
         "classification applies to 'probabilities'"),
        (lambda: http.infer(MODEL, good, outputs=[
            thttp.InferRequestedOutput("probabilities", class_count=11)]), 400,
         "classification count must be 1 to 10"),
        (lambda: http.infer(MODEL, [thttp.InferInput("image", [1], "FP32").set_data_from_numpy(
            np.zeros(1, np.float32))]), 400, "datatype FP32"),
        (lambda: http.infer(MODEL, [thttp.InferInput("pixels", [1, 1, 32, 32], "UINT8")
                                    .set_data_from_numpy(np.zeros((1, 1, 32, 32), np.uint8))]),
         400, "[N, C, H, W] = [1, 1, 28, 28]"),
        (lambda: http.infer(MODEL, [thttp.InferInput("tokens", [1], "BYTES")
                                    .set_data_from_numpy(images_tensor([b"x"]))]), 400,
         "unknown input 'tokens'"),
        (lambda: http.infer(MODEL, [*good, thttp.InferInput(
            "pixels", [1, 1, 28, 28], "UINT8").set_data_from_numpy(
                np.zeros((1, 1, 28, 28), np.uint8))]), 400, "exactly one input"),
    ]
    for call, status, fragment in cases:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert_rest_error(e, status, fragment)
    url = f"/v2/models/{MODEL}/infer"
    limit = live.service.settings.max_upload_bytes
    short_header = (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
                    b'"parameters": {"binary_data_size": 6}}]}')
    with rest(live) as c:
        raw_cases: list[tuple[httpx.Response, int, str]] = [
            (c.post(url, content=b"{not json"), 400, "not valid JSON"),
            (c.post(url, json={"inputs": []}), 400, "'inputs' must be a non-empty list"),
            (c.post(url, json={"inputs": [{"name": "image", "datatype": "BYTES",
                                           "shape": [1]}]}), 400, "neither 'data'"),
            (c.post(url, json={"inputs": [{"name": "pixels", "datatype": "UINT8",
                                           "shape": [1, 1, 28, 28], "data": [300] * 784}]}),
             400, "0 to 255"),
            (c.post(url, content=b'{"inputs": []}', headers={
                "Inference-Header-Content-Length": "999"}), 400, "does not fit"),
            (c.post(url, content=short_header + b"\x05\x00\x00\x00ab",
                    headers={"Inference-Header-Content-Length": str(len(short_header))}), 400,
             "runs past the end"),
            (c.post(url, content=b"x" * (limit + 1)), 413, "exceeds"),
            (c.post(url, content=b"{}", headers={"Content-Encoding": "br"}), 400,
             "Content-Encoding br"),
            (c.get(url), 405, "method GET not allowed"),
            (c.get("/v2/repository/index"), 404, "no such route"),
        ]
        for r, status, fragment in raw_cases:
            assert r.status_code == status, (r.status_code, r.text)
            assert fragment in r.json()["error"], r.json()
        # a request body that inflates past the limit is refused, not inflated
        bomb = gzip.compress(b"\0" * (limit + 1024 * 1024))
        r = c.post(url, content=bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and "decompressed" in r.json()["error"]
        assert c.get("/healthz").status_code == 200  # the process is unharmed


def test_grpc_errors_have_the_right_codes(rpc: tgrpc.InferenceServerClient) -> None:
    good = [grpc_image_input([png_bytes(1)])]
    cases: list[tuple[Any, grpc.StatusCode, str]] = [
        (lambda: rpc.infer("nope", good), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (lambda: rpc.infer(MODEL, [grpc_image_input([b"GIF89a broken"])]),
         grpc.StatusCode.INVALID_ARGUMENT, "unsupported_image"),
        (lambda: rpc.infer(MODEL, good, outputs=[tgrpc.InferRequestedOutput("x")]),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'x'"),
        (lambda: rpc.infer(MODEL, [tgrpc.InferInput("image", [1], "INT32").set_data_from_numpy(
            np.zeros(1, np.int32))]), grpc.StatusCode.INVALID_ARGUMENT, "datatype INT32"),
    ]
    for call, code, fragment in cases:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert_grpc_error(e, code, fragment)
    with pytest.raises(InferenceServerException) as e:
        rpc.get_model_repository_index()  # Triton-only RPCs stay unimplemented
    assert e.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)
    assert rpc.is_server_live()


def test_metrics_count_oip_and_grpc_requests(live: LiveServer, http: thttp.InferenceServerClient,
                                             rpc: tgrpc.InferenceServerClient) -> None:
    with rest(live) as c:
        before = c.get("/metrics").text
        http.infer(MODEL, [http_image_input([png_bytes(60), png_bytes(61)])])
        rpc.infer(MODEL, [grpc_image_input([png_bytes(62)])])
        with pytest.raises(InferenceServerException):
            rpc.infer("nope", [grpc_image_input([png_bytes(62)])])
        after = c.get("/metrics").text

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    route = 'route="POST /v2/models/{name}/infer"'
    assert delta(f'imgrec_requests_total{{{route},status="200"}}') == 1
    assert delta(f"imgrec_images_total{{{route}}}") == 2
    assert delta('imgrec_requests_total{route="gRPC ModelInfer",status="OK"}') == 1
    assert delta('imgrec_requests_total{route="gRPC ModelInfer",status="NOT_FOUND"}') == 1
    assert delta('imgrec_request_seconds_count{route="gRPC ModelInfer"}') == 2


# -- concurrency: one batcher for every protocol ---------------------------------------------------
async def test_64_concurrent_infers_share_batches_and_agree_with_predict(
        live: LiveServer) -> None:
    blobs = [png_bytes(200 + i) for i in range(64)]
    probs, emb, _ = await asyncio.to_thread(predict_reference, live, blobs[:32])
    probs2, emb2, _ = await asyncio.to_thread(predict_reference, live, blobs[32:])
    probs, emb = np.concatenate([probs, probs2]), np.concatenate([emb, emb2])
    batches_before = live.service.batcher.stats.batches if live.service.batcher else 0
    http = thttp_aio.InferenceServerClient(live.url, conn_limit=64)
    rpc = tgrpc_aio.InferenceServerClient(live.grpc_url)
    try:
        def http_call(i: int) -> Any:
            inp = thttp_aio.InferInput("image", [1], "BYTES")
            inp.set_data_from_numpy(images_tensor([blobs[i]]))
            return http.infer(MODEL, [inp])

        def grpc_call(i: int) -> Any:
            inp = tgrpc_aio.InferInput("image", [1], "BYTES")
            inp.set_data_from_numpy(images_tensor([blobs[i]]))
            return rpc.infer(MODEL, [inp])

        calls = [http_call(i) if i % 2 else grpc_call(i) for i in range(64)]
        results = await asyncio.gather(*calls)
    finally:
        await http.close()
        await rpc.close()
    got_p = np.concatenate([r.as_numpy("probabilities") for r in results])
    got_e = np.concatenate([r.as_numpy("embedding") for r in results])
    np.testing.assert_allclose(got_p, probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_e, emb, rtol=1e-4, atol=1e-5)
    assert live.service.batcher is not None
    batches = live.service.batcher.stats.batches - batches_before
    assert batches < 64, f"{batches} forward passes for 64 concurrent images: no batching"


# -- overload, deadlines, draining -----------------------------------------------------------------
def test_overload_deadline_and_drain(served_model_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    with LiveServer(served_model_dir, tmp_path, max_queue=2, max_files=2, max_batch_size=1,
                    request_timeout_ms=1500, retry_after_s=3, embed_store="memory") as live:
        http = thttp.InferenceServerClient(live.url)
        rpc = tgrpc.InferenceServerClient(live.grpc_url)
        gate.close()
        # one image blocked in the network, two waiting: the queue is full
        first = ThreadPoolExecutor(1)
        blocked = first.submit(thttp.InferenceServerClient(live.url).infer, MODEL,
                               [http_image_input([png_bytes(1)])])
        wait_until(lambda: gate.held == 1, 20, "the first image to be held in the network",
                   interval_s=0.01)
        batcher = live.service.batcher
        assert batcher is not None and batcher.depth == 0  # taken by the worker, blocked
        errors: list[Any] = []
        both = threading.Event()

        def answered(result: Any, error: Any) -> None:
            errors.append(error)
            if len(errors) == 2:
                both.set()

        for i in (2, 3):
            rpc.async_infer(MODEL, [grpc_image_input([png_bytes(i)])], callback=answered)
        wait_until(lambda: batcher.depth == 2, 5, "two images to queue")
        with rest(live) as c:
            r = c.post(f"/v2/models/{MODEL}/infer", json={"inputs": [{
                "name": "image", "datatype": "BYTES", "shape": [1],
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(png_bytes(4)).decode()]}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert "queue full" in r.json()["error"]
        with pytest.raises(InferenceServerException) as e:
            rpc.infer(MODEL, [grpc_image_input([png_bytes(5)])])
        assert_grpc_error(e, grpc.StatusCode.UNAVAILABLE, "queue full")
        # the queued images' deadline passes while the network is blocked
        assert both.wait(10)
        assert [str(err.status()) for err in errors] == [str(grpc.StatusCode.DEADLINE_EXCEEDED)] * 2
        gate.open.set()
        try:  # answered: its own deadline may have passed while it ran, either is fine
            assert blocked.result(10).as_numpy("probabilities").shape == (1, CLASSES)
        except InferenceServerException as late:
            assert late.status() == "504"
        # the worker takes the two expired images off the queue and drops them
        wait_until(lambda: batcher.stats.expired == 2 and batcher.depth == 0, 20,
                   "the expired images to be dropped", interval_s=0.01)
        assert gate.images == 1  # the expired images never reached the network
        # draining: readiness off at once on both protocols, while the lame duck still
        # answers inference (the Service decides; the protocols only translate)
        live.service.begin_drain()
        assert not http.is_server_ready() and not rpc.is_server_ready()
        assert not rpc.is_model_ready(MODEL)
        assert rpc.infer(MODEL, [grpc_image_input([png_bytes(7)])]).as_numpy(
            "probabilities").shape == (1, CLASSES)
        http.close()
        rpc.close()
        first.shutdown()


def test_grpc_port_zero_turns_grpc_off(served_model_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from app.api.oip import grpc_server

    async def never(*args: Any) -> None:
        raise AssertionError("the gRPC server was started")

    monkeypatch.setattr(grpc_server, "start_grpc", never)
    with LiveServer(served_model_dir, tmp_path, grpc_port=0) as live:
        assert thttp.InferenceServerClient(live.url).is_server_live()
        rpc = tgrpc.InferenceServerClient(f"{LOOPBACK}:{free_port()}")
        with pytest.raises(InferenceServerException):
            rpc.is_server_live(client_timeout=2)
        rpc.close()


async def test_rest_infer_stores_vectors_in_the_callers_namespace(served_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    """The OIP skin checks the API key itself and stores under that key's namespace (the
    Service's store key), not the default one."""
    from app.api.auth import namespace_of_key
    from app.serving.errors import UnknownId

    key = "tenant-a-key-0123456789"
    keys = tmp_path / "keys"
    keys.write_text(key + "\n")
    app = create_app(make_settings(served_model_dir, tmp_path, embed_store="memory",
                                   api_keys_file=keys))
    blob = png_bytes(70)
    header = (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
              b'"parameters": {"binary_data_size": %d}}]}' % (4 + len(blob)))
    async with running(app) as c:
        body = header + len(blob).to_bytes(4, "little") + blob
        refused = await c.post(f"/v2/models/{MODEL}/infer", content=body,
                               headers={"Inference-Header-Content-Length": str(len(header))})
        r = await c.post(f"/v2/models/{MODEL}/infer", content=body,
                         headers={"Inference-Header-Content-Length": str(len(header)),
                                  "Authorization": f"Bearer {key}"})
        assert refused.status_code == 401 and "error" in refused.json()
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert r.status_code == 200, r.text
        service: Service = app.state.service
        image_id = hashlib.sha256(blob).hexdigest()
        found = await service.lookup([image_id], namespace=namespace_of_key(key))
        assert [i for i, _ in found] == [image_id]
        with pytest.raises(UnknownId):
            await service.lookup([image_id])


def test_api_keys_guard_inference_on_both_protocols(served_model_dir: Path,
                                                    tmp_path: Path) -> None:
    key = "oip-test-key-0123456789"
    keys_file = tmp_path / "keys"
    keys_file.write_text(key + "\n")
    blob = png_bytes(80)
    with LiveServer(served_model_dir, tmp_path, api_keys_file=keys_file,
                    embed_store="memory") as live:
        http = thttp.InferenceServerClient(live.url)
        rpc = tgrpc.InferenceServerClient(live.grpc_url)
        # health and metadata stay open
        assert http.is_server_ready() and rpc.is_server_ready()
        assert rpc.get_model_metadata(MODEL).name == MODEL
        with pytest.raises(InferenceServerException) as e:
            http.infer(MODEL, [http_image_input([blob])])
        assert e.value.status() == "401"
        # the protocol's own error body, with the bearer challenge
        with rest(live) as c:
            r = c.post(f"/v2/models/{MODEL}/infer", content=b"{}")
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert isinstance(r.json()["error"], str) and "API key" in r.json()["error"]
        for headers in (None, {"authorization": "Bearer not-the-key-0123456789"}):
            with pytest.raises(InferenceServerException) as e:
                rpc.infer(MODEL, [grpc_image_input([blob])], headers=headers)
            assert_grpc_error(e, grpc.StatusCode.UNAUTHENTICATED, "API key")
        # (a dict each: tritonclient.http adds its own headers to the one it is given)
        assert http.infer(MODEL, [http_image_input([blob])], headers={
            "authorization": f"Bearer {key}"}).as_numpy("probabilities").shape == (1, CLASSES)
        assert rpc.infer(MODEL, [grpc_image_input([blob])], headers={
            "authorization": f"Bearer {key}"}).as_numpy(
            "embedding").shape == (1, 256)
        # stored in the key's namespace: found with the key, not without
        with rest(live) as c:
            image_id = hashlib.sha256(blob).hexdigest()
            assert c.get("/embed", params={"id": image_id},
                         headers={"Authorization": f"Bearer {key}"}).status_code == 200
        http.close()
        rpc.close()
