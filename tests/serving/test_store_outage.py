"""Store outages never fail a prediction: real SQLite failures in the app, and a real
redis-server killed and restarted under load behind a real `imgrec serve`.

During an outage POST /predict and /embed answer 200 with `X-Imgrec-Stored: false` (and
imgrec_store_unstored_images_total counts the vectors), GET /embed answers 503 with Retry-After,
the outage is logged once when it begins and once when it ends, and the store is used again
when it is back, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from helpers.apps import image_id, metric, running, upload
from helpers.daemons import LOOPBACK, start_redis, start_replica, wait_until

from app.main import create_app
from app.serving.service import Service
from app.serving.store import SQLiteStore
from app.serving.store.guard import GuardedStore
from app.settings import Settings

# Short waits, so that a test sees a whole outage in seconds; the first probe comes late
# enough (1.2-1.8 s) for the outage to be looked at before it.
FAST_BREAKER = {"embed_store_timeout_s": 0.3, "embed_store_backoff_min_s": 1.5,
                "embed_store_backoff_max_s": 3.0}
BEGAN = "embedding store unavailable"
ENDED = "embedding store available again"


def app_with_sqlite(model_dir: Path, path: Path) -> FastAPI:
    return create_app(Settings(model_dir=model_dir, device="cpu", warmup_batches=1,
                               embed_store=str(path), **FAST_BREAKER))


def sqlite_of(app: FastAPI) -> SQLiteStore:
    service: Service = app.state.service
    assert isinstance(service.store, GuardedStore)
    inner = service.store.store
    assert isinstance(inner, SQLiteStore)
    return inner


async def assert_degraded(c: httpx.AsyncClient, seeds: range, stored_seed: int) -> None:
    """Predictions and embeddings answered in full and marked unstored; lookups 503."""
    r = await c.post("/embed", files=upload(*[s + 1000 for s in seeds]))
    assert r.status_code == 200, r.text
    assert r.headers["x-imgrec-stored"] == "false"
    assert len(r.json()["results"]) == len(seeds)
    for s in seeds:
        r = await c.post("/predict", files=upload(s))
        assert r.status_code == 200, r.text
        assert r.headers["x-imgrec-stored"] == "false"
        assert len(r.json()["results"][0]["labels"]) == 5
    r = await c.get("/embed", params={"id": image_id(stored_seed)})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "store_unavailable"
    assert int(r.headers["retry-after"]) >= 1
    m = (await c.get("/metrics")).text
    assert metric(m, "imgrec_store_up") == 0
    assert metric(m, "imgrec_store_unstored_images_total") >= 2 * len(seeds)


async def assert_recovers(c: httpx.AsyncClient, seed: int) -> None:
    """Within a few probe intervals a new vector is stored again and found by GET /embed."""
    deadline = time.monotonic() + 30
    while True:
        r = await c.post("/embed", files=upload(seed))
        assert r.status_code == 200, r.text
        if r.headers["x-imgrec-stored"] == "true":
            break
        assert time.monotonic() < deadline, "the store was not used again after its outage"
        await asyncio.sleep(0.1)
    vector = r.json()["results"][0]["embedding"]
    r = await c.get("/embed", params={"id": image_id(seed)})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["results"][0]["embedding"], vector, rtol=1e-6)
    assert metric((await c.get("/metrics")).text, "imgrec_store_up") == 1


def outage_log_lines(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    messages = [r.getMessage() for r in caplog.records if r.name == "imgrec.store"
                and r.levelno >= logging.WARNING]
    return (sum(BEGAN in m for m in messages), sum(ENDED in m for m in messages))


async def test_sqlite_locked_by_another_process(tiny_model_dir: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Another connection holds SQLite's write lock (a backup, a stuck writer): every write
    would wait out the busy timeout and fail; instead the breaker skips them."""
    caplog.set_level(logging.INFO, logger="imgrec")
    db = tmp_path / "emb.sqlite3"
    async with running(app_with_sqlite(tiny_model_dir, db)) as c:
        r = await c.post("/embed", files=upload(1))
        assert r.status_code == 200 and r.headers["x-imgrec-stored"] == "true"
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            await assert_degraded(c, range(10, 16), stored_seed=1)
            m = (await c.get("/metrics")).text
            # one write waited for the lock and failed; the other batches did not try
            assert metric(m, 'imgrec_store_errors_total{op="put"}') <= 2
        finally:
            other.execute("ROLLBACK")
            other.close()
        await assert_recovers(c, 2)
    assert outage_log_lines(caplog) == (1, 1)


async def test_sqlite_full_then_read_only(tiny_model_dir: Path, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """SQLite's own errors on the app's connection, one outage after the other: SQLITE_FULL
    ("database or disk is full") by capping the file at its current page count, which is how
    SQLite reports a full disk, then SQLITE_READONLY ("attempt to write a readonly database")
    by PRAGMA query_only, as on a volume remounted read-only. (Root, which runs CI, ignores
    file modes, so chmod cannot make the file read-only here.)"""
    caplog.set_level(logging.INFO, logger="imgrec")
    app = app_with_sqlite(tiny_model_dir, tmp_path / "emb.sqlite3")
    async with running(app) as c:
        r = await c.post("/embed", files=upload(1))
        assert r.status_code == 200 and r.headers["x-imgrec-stored"] == "true"
        store = sqlite_of(app)
        with store._lock:
            pages = store._db.execute("PRAGMA page_count").fetchone()[0]
            store._db.execute(f"PRAGMA max_page_count = {pages}")
        # eight 1 KiB vectors in one write need new pages: the write fails
        await assert_degraded(c, range(20, 28), stored_seed=1)
        with store._lock:
            store._db.execute("PRAGMA max_page_count = 1073741823")
        await assert_recovers(c, 3)
        # a probe may succeed while the disk is still full (it rewrites a row in place) and
        # the next write fail again: that is the same outage, not a new one
        assert outage_log_lines(caplog) == (1, 1)

        with store._lock:
            store._db.execute("PRAGMA query_only = ON")
        await assert_degraded(c, range(40, 43), stored_seed=1)
        with store._lock:
            store._db.execute("PRAGMA query_only = OFF")
        await assert_recovers(c, 5)
        # the vectors stored before the outages are still there
        assert (await c.get("/embed", params={"id": image_id(1)})).status_code == 200
    assert outage_log_lines(caplog) == (2, 2)


async def test_store_that_cannot_open_at_start_up(tiny_model_dir: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A store that cannot be opened at start-up (here: its directory is a file) does not keep
    the service from serving; once the path is fixed, the store opens without a restart."""
    caplog.set_level(logging.INFO, logger="imgrec")
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")
    async with running(app_with_sqlite(tiny_model_dir, blocker / "emb.sqlite3")) as c:
        assert (await c.get("/readyz")).status_code == 200
        await assert_degraded(c, range(30, 33), stored_seed=30)
        blocker.unlink()
        await assert_recovers(c, 4)
    assert (tmp_path / "data" / "emb.sqlite3").exists()
    assert outage_log_lines(caplog) == (1, 1)


@pytest.mark.slow
def test_redis_killed_and_restarted_under_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    redis_daemon, url = start_redis(tmp_path)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    daemons = [redis_daemon]
    replica, api_port = start_replica(
        "imgrec", tmp_path, tiny_model_dir,
        {"IMGREC_EMBED_STORE": url, "IMGREC_WARMUP_BATCHES": "1",
         "IMGREC_EMBED_STORE_BACKOFF_MIN_S": "0.1", "IMGREC_EMBED_STORE_BACKOFF_MAX_S": "0.5"})
    daemons.append(replica)
    base = f"http://{LOOPBACK}:{api_port}"
    lock = threading.Lock()
    outcomes: list[tuple[str, int, str]] = []  # (phase, status, X-Imgrec-Stored)
    failures: list[str] = []
    phase = {"now": "before"}
    stop = threading.Event()

    def load(t: int) -> None:
        with httpx.Client(timeout=30) as client:
            for i in range(100_000):  # bounded; stop is set long before
                if stop.is_set():
                    return
                path = "/predict" if i % 2 else "/embed"
                seed = 100_000 * (t + 1) + i
                try:
                    r = client.post(base + path, files=upload(seed))
                    ok = r.status_code == 200 and r.json()["results"][0]["id"] == image_id(seed)
                    row = (phase["now"], r.status_code, r.headers.get("x-imgrec-stored", ""))
                    detail = f"{path} -> {r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, row, detail = False, (phase["now"], 0, ""), f"{path} -> {e!r}"
                with lock:
                    outcomes.append(row)
                    if not ok:
                        failures.append(detail)

    def count(which: str, stored: str | None = None) -> int:
        with lock:
            return sum(p == which and (stored is None or s == stored) for p, _, s in outcomes)

    threads = [threading.Thread(target=load, args=(t,)) for t in range(3)]
    try:
        with httpx.Client(timeout=30) as client:
            r = client.post(base + "/embed", files=upload(7))
            assert r.status_code == 200 and r.headers["x-imgrec-stored"] == "true"
            for th in threads:
                th.start()
            wait_until(lambda: count("before") >= 15, 60, "load to start", replica)

            redis_daemon.kill()  # SIGKILL, mid-load: writes in flight fail
            phase["now"] = "down"
            wait_until(lambda: count("down", "false") >= 20, 60, "answers during the outage",
                       replica)
            r = client.get(base + "/embed", params={"id": image_id(7)})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_unavailable"
            assert int(r.headers["retry-after"]) >= 1
            m = client.get(base + "/metrics").text
            assert metric(m, "imgrec_store_up") == 0
            assert metric(m, "imgrec_store_unstored_images_total") >= 20
            # the breaker skipped the writes: only those in flight at the kill were tried
            assert metric(m, 'imgrec_store_errors_total{op="put"}') <= 3

            redis_daemon.stop()
            redis_daemon, _ = start_redis(tmp_path, port=port)  # the same address, empty
            daemons.append(redis_daemon)
            phase["now"] = "back"
            wait_until(lambda: count("back", "true") >= 10, 60, "writes after the restart",
                       replica)
            stop.set()
            for th in threads:
                th.join(timeout=60)
            r = client.post(base + "/embed", files=upload(8))
            assert r.status_code == 200 and r.headers["x-imgrec-stored"] == "true"
            r = client.get(base + "/embed", params={"id": image_id(8)})
            assert r.status_code == 200, r.text
            # Redis restarted empty (no persistence here): what was stored before is gone
            assert client.get(base + "/embed", params={"id": image_id(7)}).status_code == 404
            assert metric(client.get(base + "/metrics").text, "imgrec_store_up") == 1
    finally:
        stop.set()
        for th in threads:
            if th.is_alive():
                th.join(timeout=60)
        for d in reversed(daemons):
            d.stop()
    assert failures == [], f"{len(failures)} failed requests, e.g. {failures[:3]}"
    assert count("down", "false") >= 20
    log = replica.log_path.read_text(errors="replace")
    assert log.count(BEGAN) == 1, log[-3000:]
    assert log.count(ENDED) == 1, log[-3000:]
