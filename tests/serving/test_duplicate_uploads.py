"""The same image twice in one batch, through the app: stored once, and never an outage.

Issue 20: `curl -F file=@a.png -F file=@a.png .../embed` made the similarity index raise
IndexError; the store guard took it for an outage, so for seconds every client's GET /embed and
/search answered 503 and other clients' vectors were not stored, while the SQLite row was
written and the index was not. Concurrent requests sharing a batch did the same whenever they
carried one image between them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from helpers.apps import image_id, metric, running, upload

from app.main import create_app
from app.serving.service import Service
from app.serving.store import SQLiteStore
from app.serving.store.guard import GuardedStore
from app.settings import Settings


def app_with_sqlite(model_dir: Path, tmp_path: Path, **kw: Any) -> FastAPI:
    return create_app(Settings(model_dir=model_dir, device="cpu", warmup_batches=1,
                               embed_store=str(tmp_path / "emb.sqlite3"), **kw))


def sqlite_of(app: FastAPI) -> SQLiteStore:
    service: Service = app.state.service
    assert isinstance(service.store, GuardedStore)
    assert isinstance(service.store.store, SQLiteStore)
    return service.store.store


async def assert_store_healthy(c: httpx.AsyncClient, *seeds: int) -> None:
    """The breaker never opened, and the stored images are found."""
    m = (await c.get("/metrics")).text
    assert metric(m, "imgrec_store_outages_total") == 0
    assert metric(m, "imgrec_store_up") == 1
    assert metric(m, "imgrec_store_unstored_images_total") == 0
    for seed in seeds:
        r = await c.get("/embed", params={"id": image_id(seed)})
        assert r.status_code == 200, r.text


async def test_one_request_with_the_same_image_twice(tiny_model_dir: Path,
                                                     tmp_path: Path) -> None:
    app = app_with_sqlite(tiny_model_dir, tmp_path)
    async with running(app) as c:
        r = await c.post("/embed", files=upload(2))  # another client's image, stored before
        assert r.status_code == 200 and r.headers["x-imgrec-stored"] == "true"

        r = await c.post("/embed", files=upload(1, 1))
        assert r.status_code == 200, r.text
        assert r.headers["x-imgrec-stored"] == "true"
        results = r.json()["results"]
        assert [x["id"] for x in results] == [image_id(1)] * 2
        assert results[0]["embedding"] == results[1]["embedding"]

        store = sqlite_of(app)
        assert store.count() == 2  # image 1 once, image 2
        await assert_store_healthy(c, 2, 1)
        # the index holds it once too: a search from image 2 finds image 1 exactly once
        r = await c.get("/search", params={"id": image_id(2), "k": 10})
        assert r.status_code == 200, r.text
        assert [n["id"] for n in r.json()["results"][0]["neighbors"]] == [image_id(1)]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait on the event loop for a condition another thread makes true (bounded)."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_concurrent_requests_sharing_a_batch_with_one_image(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight clients post the same few images at once: their requests share one batch, which
    carries each image several times."""
    entered, release = threading.Event(), threading.Event()
    forward = Service._forward

    def held(service: Service, items: list[Any]) -> Any:
        entered.set()
        release.wait(30)
        return forward(service, items)

    # the batcher takes the bound method at start-up: patched before the app starts
    monkeypatch.setattr(Service, "_forward", held)
    release.set()
    app = app_with_sqlite(tiny_model_dir, tmp_path, max_batch_size=64)
    async with running(app) as c:
        entered.clear()
        release.clear()
        first = asyncio.ensure_future(c.post("/embed", files=upload(9)))
        await until(entered.is_set, "the first batch to reach the network")
        clients = [asyncio.ensure_future(c.post("/embed", files=upload(1, 2, 1)))
                   for _ in range(8)]
        batcher = app.state.service.batcher
        await until(lambda: batcher.depth == 24, "the eight requests to queue")
        release.set()
        answers = await asyncio.gather(first, *clients)
        for r in answers:
            assert r.status_code == 200, r.text
            assert r.headers["x-imgrec-stored"] == "true"
        assert sqlite_of(app).count() == 3  # images 9, 1 and 2, once each
        await assert_store_healthy(c, 9, 1, 2)
