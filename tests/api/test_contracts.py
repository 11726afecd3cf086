"""The contracts every skin shares, seen from outside: one route table (metrics labels, stored
header), one accepting-work check counted once, the Service's filename cleaning and image-count
bound on every protocol. Each of these disagreed between skins before the core owned them."""

from __future__ import annotations

from pathlib import Path

import httpx
from conftest import png_bytes
from helpers.apps import metric, running

from app.main import create_app
from app.serving.service import Lifecycle, Service
from app.settings import Settings


def app_for(model_dir: Path, tmp_path: Path, **kw: object) -> object:
    return create_app(Settings(model_dir=model_dir, device="cpu", warmup_batches=1,
                               embed_store=str(tmp_path / "emb.sqlite3"), grpc_port=0,
                               max_files=3, **kw))  # type: ignore[arg-type]


async def metrics_text(c: httpx.AsyncClient) -> str:
    return (await c.get("/metrics")).text


async def test_search_is_its_own_route_in_metrics_and_says_whether_it_stored(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    async with running(app_for(tiny_model_dir, tmp_path)) as c:  # type: ignore[arg-type]
        r = await c.post("/search?k=3", files=[("file", ("a.png", png_bytes(1)))])
        assert r.status_code == 200, r.text
        assert r.headers["x-imgrec-stored"] == "true"
        image_id = r.json()["results"][0]["id"]
        assert (await c.get("/search", params={"id": image_id})).status_code == 200
        text = await metrics_text(c)
    assert metric(text, 'imgrec_requests_total{route="POST /search",status="200"}') == 1
    assert metric(text, 'imgrec_requests_total{route="GET /search",status="200"}') == 1
    assert metric(text, 'imgrec_images_total{route="POST /search"}') == 1
    assert 'route="POST other"' not in text and 'route="GET other"' not in text


async def test_every_route_answers_the_same_cleaned_filename(tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    raw = "  shirt\u200b.png  "  # blanks around, a zero-width space (a format character)
    async with running(app_for(tiny_model_dir, tmp_path)) as c:  # type: ignore[arg-type]
        predicted = await c.post("/predict", files=[("file", (raw, png_bytes(2)))])
        searched = await c.post("/search", files=[("file", (raw, png_bytes(2)))])
    assert predicted.json()["results"][0]["filename"] == "shirt.png"
    assert searched.json()["results"][0]["filename"] == "shirt.png"


async def test_refusals_while_not_ready_are_counted_once_on_every_route(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    app = app_for(tiny_model_dir, tmp_path)
    async with running(app) as c:  # type: ignore[arg-type]
        service: Service = app.state.service  # type: ignore[attr-defined]
        service.state = Lifecycle.STOPPED  # as after stop(), but with the app still up
        try:
            files = [("file", ("a.png", png_bytes(3)))]
            answers = [await c.post("/predict", files=files), await c.post("/embed", files=files),
                       await c.post("/search", files=files)]
        finally:
            service.state = Lifecycle.READY
        text = await metrics_text(c)
    assert [a.status_code for a in answers] == [503, 503, 503]
    assert all(a.headers["retry-after"] == "1" for a in answers)
    assert all(a.json()["error"]["code"] == "not_ready" for a in answers)
    assert metric(text, 'imgrec_rejections_total{reason="not_ready"}') == 3
    assert metric(text, 'imgrec_requests_total{route="POST /search",status="503"}') == 1


async def test_the_image_count_bound_is_the_services_on_every_protocol(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    four = [("file", (f"{i}.png", png_bytes(i))) for i in range(4)]
    element = png_bytes(9)
    tensor = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [4],
                          "data": [element.decode("latin-1")] * 4}]}
    async with running(app_for(tiny_model_dir, tmp_path)) as c:  # type: ignore[arg-type]
        http = await c.post("/predict", files=four)
        card = (await c.get("/model")).json()
        oip = await c.post(f"/v2/models/{card['name']}/infer", json=tensor)
    assert http.status_code == 413 and http.json()["error"]["code"] == "too_many_files"
    # the protocol's own status for every bad input, with the Service's reason
    assert oip.status_code == 400 and "at most 3" in oip.json()["error"]
