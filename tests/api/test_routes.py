"""The HTTP contract with the lifespan running: routes, errors, batching, overload, shutdown."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers.apps import Gate, metric, running
from helpers.images import encode, png_bytes
from helpers.waits import until
from PIL import Image
from prometheus_client import generate_latest

from app.main import create_app
from app.model.card import InputSpec
from app.serving.service import Lifecycle, Service
from app.serving.upload_checks import prepare
from app.settings import Settings
from app.training.data import ImageDataset, scan_image_folder

Client = httpx.AsyncClient
MakeSettings = Callable[..., Settings]


@pytest.fixture()
async def client(tiny_settings: MakeSettings) -> AsyncIterator[Client]:
    async with running(create_app(tiny_settings())) as c:
        yield c


def files(*blobs: bytes, name: str = "file") -> list[tuple[str, tuple[str, bytes]]]:
    return [(name, (f"img{i}.png", b)) for i, b in enumerate(blobs)]


# -- routes ------------------------------------------------------------------------------------
async def test_predict_answers_each_file_in_order(client: Client) -> None:
    blobs = [png_bytes(i) for i in range(3)]
    r = await client.post("/predict", params={"top_k": 3}, files=files(*blobs))
    labels = (await client.get("/model")).json()["labels"]
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == {"name": "test-fashion-small", "version": "0"}
    assert [x["id"] for x in body["results"]] == [hashlib.sha256(b).hexdigest() for b in blobs]
    assert [x["filename"] for x in body["results"]] == ["img0.png", "img1.png", "img2.png"]
    for res in body["results"]:
        scores = [lab["score"] for lab in res["labels"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert 0 < sum(scores) <= 1.0001
        assert "embedding" not in res
        assert {lab["label"] for lab in res["labels"]} <= set(labels)


async def test_predict_with_embedding_and_default_top_k(client: Client) -> None:
    r = await client.post("/predict", params={"embedding": "true"}, files=files(png_bytes(7)))
    res = r.json()["results"][0]
    assert len(res["labels"]) == 5
    assert len(res["embedding"]) == 256 and min(res["embedding"]) >= 0


async def test_embed_post_and_get_round_trip(client: Client) -> None:
    blobs = [png_bytes(10), png_bytes(11)]
    posted = (await client.post("/embed", files=files(*blobs))).json()["results"]
    ids = [p["id"] for p in posted]
    got = (await client.get("/embed", params={"id": ids})).json()["results"]
    assert [g["id"] for g in got] == ids
    for p, g in zip(posted, got, strict=True):
        assert np.allclose(p["embedding"], g["embedding"], rtol=1e-6)
    unit = (await client.post("/embed", params={"normalize": "true"},
                              files=files(blobs[0]))).json()
    assert abs(np.linalg.norm(unit["results"][0]["embedding"]) - 1) < 1e-5
    # vectors computed by /predict are kept too
    pid = (await client.post("/predict", files=files(png_bytes(12)))).json()["results"][0]["id"]
    assert (await client.get("/embed", params={"id": pid})).status_code == 200


async def test_get_embed_names_unknown_ids(client: Client) -> None:
    known = (await client.post("/embed", files=files(png_bytes(20)))).json()["results"][0]["id"]
    unknown = "ab" * 32
    r = await client.get("/embed", params={"id": [known, unknown]})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_id" and unknown in r.json()["error"]["message"]
    assert known not in r.json()["error"]["message"]
    assert (await client.get("/embed", params={"id": "xyz"})).status_code == 422
    assert (await client.get("/embed")).status_code == 422


async def test_model_health_ready_metrics_docs(client: Client) -> None:
    m = (await client.get("/model")).json()
    assert m["preset"] == "fashion-small" and m["device"] == "cpu" and m["dtype"] == "float32"
    assert m["batching"]["max_batch_size"] == 32 and len(m["labels"]) == 10
    assert m["input"]["size"] == 28 and m["embedding_dim"] == 256
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    await client.post("/predict", files=files(png_bytes(1)))
    text = (await client.get("/metrics")).text
    for name in ("imgrec_requests_total", "imgrec_request_seconds_bucket", "imgrec_queue_depth",
                 "imgrec_batch_size_bucket", "imgrec_decode_seconds_count",
                 "imgrec_inference_seconds_count", "imgrec_store_write_seconds_count",
                 "imgrec_images_total"):
        assert name in text, name
    for observed in ("imgrec_decode_seconds_count", "imgrec_inference_seconds_count",
                     "imgrec_store_write_seconds_count"):
        assert metric(text, observed) >= 1, observed
    assert 'route="POST /predict",status="200"' in text
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("RGB", "JPEG"), ("L", "BMP"),
                                      ("P", "GIF"), ("RGB", "WEBP"), ("LA", "PNG"),
                                      ("1", "PNG"), ("I;16", "PNG")])
async def test_any_colour_mode_and_size_is_accepted(client: Client, mode: str, fmt: str) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (61, 45, 3), dtype=np.uint8)).convert(mode)
    r = await client.post("/predict", files=files(encode(img, fmt)))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("RGB", "JPEG"), ("L", "PNG"),
                                      ("P", "GIF"), ("LA", "PNG"), ("1", "BMP"),
                                      ("I;16", "PNG"), ("CMYK", "JPEG"), ("RGB", "TIFF")])
@pytest.mark.parametrize("side", [28, 61, 300])
def test_served_pixels_are_the_trainers_pixels(mode: str, fmt: str, channels: int, side: int,
                                               tmp_path: Path) -> None:
    """prepare()'s bytes must be exactly what the trainer's ImageFolder loader gives for the same
    file, at the input size and resized (300 px JPEGs are decoded at a reduced scale by both)."""
    spec = InputSpec(size=28, channels=channels, mean=[0.5] * channels, std=[0.5] * channels)
    rng = np.random.default_rng(side)
    img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).convert(mode)
    data = encode(img, fmt)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / f"x.{fmt.lower()}").write_bytes(data)
    split, _ = scan_image_folder(tmp_path)
    trainer_pixels, _ = ImageDataset(split, spec)[0]
    assert prepare(data, spec, 10**6) == trainer_pixels.numpy().tobytes()


async def test_animated_gif_uses_its_first_frame(client: Client) -> None:
    frames = [Image.new("L", (28, 28), c) for c in (0, 255)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = encode(frames[0], "PNG")
    a = (await client.post("/predict", params={"top_k": 10}, files=files(gif))).json()
    b = (await client.post("/predict", params={"top_k": 10}, files=files(first))).json()
    assert a["results"][0]["labels"] == b["results"][0]["labels"]


def error(r: httpx.Response) -> tuple[int, str]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return r.status_code, body["error"]["code"]


async def test_bad_requests_get_clear_json_errors(client: Client) -> None:
    png = png_bytes(0)
    assert error(await client.post("/predict", files=files(png, name="other")))[0] == 400
    assert error(await client.post("/predict", data={"x": "1"}))[0] == 400
    assert error(await client.post("/predict", content=b"{}",
                             headers={"content-type": "application/json"}))[0] == 400
    truncated_multipart = (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; "
                           b"filename=\"a.png\"\r\n\r\n" + png)
    assert error(await client.post("/predict", content=truncated_multipart,
                             headers={"content-type": "multipart/form-data; boundary=xyz"})) \
        == (400, "bad_request")
    assert error(await client.post("/predict", files=files(b"not an image"))) \
        == (415, "unsupported_image")
    assert error(await client.post("/predict", files=files(b""))) == (415, "unsupported_image")
    pcx = encode(Image.new("L", (8, 8)), "PCX")  # a format Pillow reads but we do not accept
    assert error(await client.post("/predict", files=files(pcx))) == (415, "unsupported_image")
    assert error(await client.post("/predict", files=files(png[: len(png) // 2]))) \
        == (415, "undecodable_image")
    assert error(await client.post("/predict", params={"top_k": 0}, files=files(png)))[0] == 422
    assert error(await client.post("/predict", params={"top_k": 11}, files=files(png)))[0] == 422
    assert error(await client.post("/predict", params={"embedding": "maybe"},
                                   files=files(png)))[0] == 422
    assert error(await client.get("/nowhere"))[0] == 404
    # and the process is healthy afterwards
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.post("/predict", files=files(png))).status_code == 200


async def test_size_limits(tiny_settings: MakeSettings) -> None:
    s = tiny_settings(max_upload_bytes=50_000, max_image_pixels=1_000_000, max_files=3)
    async with running(create_app(s)) as c:
        big = encode(Image.new("L", (2000, 2000)), "PNG")  # 4 Mpx, but only a few kB compressed
        assert len(big) < 50_000
        assert error(await c.post("/predict", files=files(big))) == (413, "image_too_large")
        noise = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
        heavy = encode(Image.fromarray(noise), "PNG")
        assert len(heavy) > 50_000
        assert error(await c.post("/predict", files=files(heavy))) == (413, "payload_too_large")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while streaming
            body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
                    + heavy + b"\r\n--b--\r\n")
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]

        r = await c.post("/predict", content=chunks(),
                         headers={"content-type": "multipart/form-data; boundary=b"})
        assert "content-length" not in r.request.headers
        assert error(r) == (413, "payload_too_large")
        assert error(await c.post("/predict", files=files(*[png_bytes(i) for i in range(4)]))) \
            == (413, "too_many_files")
        ok = await c.post("/predict", files=files(*[png_bytes(i) for i in range(3)]))
        assert ok.status_code == 200


# -- batching, overload, deadlines, shutdown -------------------------------------------------
async def test_concurrent_requests_are_batched_and_equal_single_answers(
        tiny_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that arrive while a batch runs form the next one: one image held in the network
    while 23 more arrive makes two forward passes in all; and the batched answers are the ones
    each image gets alone."""
    blobs = [png_bytes(100 + i) for i in range(24)]
    params = {"top_k": 10, "embedding": "true"}
    async with running(create_app(tiny_settings(max_batch_size=1, embed_store="memory"))) as c:
        alone = [(await c.post("/predict", params=params, files=files(b))).json() for b in blobs]
    gate = Gate(monkeypatch)
    batched = create_app(tiny_settings(max_batch_size=32, embed_store="memory"))
    async with running(batched) as c:
        gate.close()
        first = asyncio.ensure_future(c.post("/predict", params=params, files=files(blobs[0])))
        await until(lambda: gate.held == 1, "the first image to be held in the network")
        others = [asyncio.ensure_future(c.post("/predict", params=params, files=files(b)))
                  for b in blobs[1:]]
        batcher = batched.state.service.batcher
        await until(lambda: batcher.depth == 23, "the other 23 images to queue")
        gate.open.set()
        rs = await asyncio.gather(first, *others)
        text = (await c.get("/metrics")).text
    batches = metric(text, "imgrec_batch_size_count")
    images = metric(text, "imgrec_batch_size_sum")  # the warm-up runs outside the batcher
    assert images == len(blobs)
    assert batches == 2, f"{batches} forward passes for 1 + 23 images"
    for a, r in zip(alone, rs, strict=True):
        b = r.json()
        ra, rb = a["results"][0], b["results"][0]
        assert ra["id"] == rb["id"]
        assert [x["index"] for x in ra["labels"]] == [x["index"] for x in rb["labels"]]
        assert np.allclose([x["score"] for x in ra["labels"]], [x["score"] for x in rb["labels"]],
                           atol=1e-5)
        assert np.allclose(ra["embedding"], rb["embedding"], atol=1e-4, rtol=1e-4)


async def test_queue_full_gets_503_with_retry_after(tiny_settings: MakeSettings,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    app = create_app(tiny_settings(max_queue=2, max_files=2, max_batch_size=1,
                                   embed_store="memory", retry_after_s=3))
    async with running(app) as c:
        gate.close()
        first = asyncio.ensure_future(c.post("/predict", files=files(png_bytes(1))))
        await until(lambda: gate.held == 1, "the first image to be held in the network")
        queued = [asyncio.ensure_future(c.post("/predict", files=files(png_bytes(i))))
                  for i in (2, 3)]
        batcher = app.state.service.batcher
        await until(lambda: batcher.depth == 2, "two images to wait: the queue is full")
        r = await c.post("/predict", files=files(png_bytes(4)))
        assert error(r) == (503, "overloaded") and r.headers["retry-after"] == "3"
        gate.open.set()
        assert all(x.status_code == 200 for x in await asyncio.gather(first, *queued))
        text = (await c.get("/metrics")).text
        assert metric(text, 'imgrec_rejections_total{reason="queue_full"}') == 1


async def test_expired_deadline_gets_504_without_a_forward_pass(
        tiny_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    app = create_app(tiny_settings(request_timeout_ms=300, max_batch_size=1,
                                   embed_store="memory"))
    async with running(app) as c:
        gate.close()
        first = asyncio.ensure_future(c.post("/predict", files=files(png_bytes(1))))
        await until(lambda: gate.held == 1, "the first image to be held in the network")
        late = await c.post("/predict", files=files(png_bytes(2)))  # waits behind the gate
        assert error(late) == (504, "deadline_exceeded")
        gate.open.set()
        await first  # its own deadline passed while it ran; that is fine either way
        # the worker takes the expired image off the queue and drops it
        batcher = app.state.service.batcher
        await until(lambda: batcher.stats.expired == 1 and batcher.depth == 0,
                    "the expired image to be dropped")
        assert gate.images == 1  # only the first image ever reached the network


async def test_shutdown_answers_every_accepted_request(
        tiny_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    app = create_app(tiny_settings(max_batch_size=4, embed_store="memory"))
    async with running(app) as c:
        gate.close()
        accepted = [asyncio.ensure_future(c.post("/predict", files=files(png_bytes(i))))
                    for i in range(20)]
        service: Service = app.state.service
        batcher = service.batcher
        assert batcher is not None
        await until(lambda: gate.held + batcher.depth == 20,
                    "all 20 images accepted: in the held batch or queued")
        stopping = asyncio.ensure_future(service.stop())  # what the lifespan shutdown runs
        await until(lambda: service.state is Lifecycle.STOPPED, "the service to stop")
        assert (await c.get("/readyz")).status_code == 503
        refused = await c.post("/predict", files=files(png_bytes(99)))
        assert error(refused)[0] == 503
        gate.open.set()
        results = await asyncio.gather(*accepted)
        await stopping
    assert [r.status_code for r in results] == [200] * 20
    assert gate.images == 20


async def test_sqlite_store_survives_a_restart(tiny_settings: MakeSettings,
                                               tmp_path: Path) -> None:
    s = tiny_settings(embed_store=str(tmp_path / "keep.sqlite3"))
    async with running(create_app(s)) as c:
        posted = (await c.post("/embed", files=files(png_bytes(5)))).json()["results"][0]
    async with running(create_app(s)) as c:
        got = await c.get("/embed", params={"id": posted["id"]})
    assert got.status_code == 200
    assert np.allclose(got.json()["results"][0]["embedding"], posted["embedding"], rtol=1e-6)


async def test_not_ready_before_the_lifespan_starts(tiny_settings: MakeSettings) -> None:
    app = create_app(tiny_settings())
    app.state.service = Service(app.state.settings)  # constructed, never started
    async with running(app, lifespan=False) as c:
        r = await c.get("/readyz")
        assert error(r) == (503, "not_ready") and "retry-after" in r.headers
        assert error(await c.post("/predict", files=files(png_bytes(1)))) == (503, "not_ready")
        assert (await c.get("/healthz")).status_code == 200


def test_settings_refuse_a_request_size_that_could_never_queue() -> None:
    with pytest.raises(ValueError, match="must not exceed max_queue"):
        Settings(max_files=10, max_queue=5)


async def test_engines_agree(tiny_settings: MakeSettings) -> None:
    blobs = [png_bytes(300 + i) for i in range(3)]
    answers = {}
    for engine in ("torch", "onnxruntime"):
        async with running(create_app(tiny_settings(engine=engine, embed_store="memory"))) as c:
            assert (await c.get("/model")).json()["engine"] == engine
            r = await c.post("/predict", params={"top_k": 10, "embedding": "true"},
                             files=files(*blobs))
            answers[engine] = r.json()["results"]
    for a, b in zip(answers["torch"], answers["onnxruntime"], strict=True):
        assert np.allclose([x["score"] for x in a["labels"]], [x["score"] for x in b["labels"]],
                           atol=1e-5)
        assert np.allclose(a["embedding"], b["embedding"], atol=1e-4, rtol=1e-4)


async def test_corrupted_uploads_never_cause_a_5xx(client: Client) -> None:
    rng = np.random.default_rng(7)
    base = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    originals = [encode(base, fmt) for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF")]
    statuses = []
    for data in originals:
        for _ in range(12):
            blob = bytearray(data)
            if rng.random() < 0.5:  # truncate
                blob = blob[: int(rng.integers(1, len(blob)))]
            for _ in range(int(rng.integers(1, 8))):  # flip bytes, headers included
                blob[int(rng.integers(0, len(blob)))] = int(rng.integers(0, 256))
            r = await client.post("/predict", files=files(bytes(blob)))
            statuses.append(r.status_code)
            assert r.status_code in (200, 413, 415), (r.status_code, r.text)
    assert 415 in statuses  # the corruption was real
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.post("/predict", files=files(originals[0]))).status_code == 200


async def test_fast_path_serves_predict_and_embed_without_the_router(
        tiny_settings: MakeSettings) -> None:
    from app.api.fastpath import FastPathMiddleware

    async def router(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError(f"{scope['method']} {scope['path']} reached the router")

    seen: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        seen.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    service = Service(tiny_settings())  # never started: not ready
    app = type("App", (), {"state": type("S", (), {"service": service})()})()
    mw = FastPathMiddleware(router)
    for path in ("/predict", "/embed"):
        seen.clear()
        scope = {"type": "http", "method": "POST", "path": path, "query_string": b"top_k=2",
                 "headers": [], "app": app}
        await mw(scope, receive, send)
        assert seen[0]["status"] == 503  # answered by the route function, not the router
    assert metric(generate_latest(service.metrics.registry).decode(),
                  'imgrec_rejections_total{reason="not_ready"}') == 2
    with pytest.raises(AssertionError, match="reached the router"):
        await mw({"type": "http", "method": "GET", "path": "/model", "headers": []},
                 receive, send)


def test_query_parameters_parse_as_the_routes_declare_them() -> None:
    from app.api.query import TOP_K, BoolParam, K
    from app.serving.errors import InvalidParameter

    flag = BoolParam("b", False, "")
    assert TOP_K.parse({"top_k": ["7"]}) == 7 and TOP_K.parse({}) == TOP_K.default
    assert flag.parse({"b": ["Yes"]}) is True and flag.parse({"b": ["off"]}) is False
    for bad in (lambda: TOP_K.parse({"top_k": ["x"]}), lambda: TOP_K.parse({"top_k": ["0"]}),
                lambda: TOP_K.parse({"top_k": [""]}), lambda: K.parse({"k": ["101"]}),
                lambda: flag.parse({"b": ["maybe"]})):
        with pytest.raises(InvalidParameter):
            bad()
