"""Search in the shared Redis store: a real server with the search module (RediSearch), the
store's older single-hash layout still loading, and a server without the module (Debian's
redis-server): vectors are stored as before, /search answers 501."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from helpers.apps import running
from helpers.daemons import REPO, Daemon, start_redis
from helpers.data import needs_data
from helpers.images import png_bytes
from helpers.settings import make_settings

from app.main import create_app
from app.serving.store.redis_store import RedisStore, _member
from app.serving.store.vector_index import SearchUnavailable

MODEL = "c" * 64


@pytest.fixture(scope="module")
def search_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    daemon: Daemon | None = None
    try:
        daemon, url = start_redis(tmp_path_factory.mktemp("redis-search"), search=True)
        yield url
    finally:
        if daemon is not None:
            daemon.stop()


@pytest.fixture(scope="module")
def plain_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    daemon: Daemon | None = None
    try:
        daemon, url = start_redis(tmp_path_factory.mktemp("redis-plain"))
        yield url
    finally:
        if daemon is not None:
            daemon.stop()


def vecs(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def cosine_ranking(x: np.ndarray, q: np.ndarray, ids: list[str],
                   exclude: str | None) -> list[tuple[str, float]]:
    s = (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    return sorted(((i, float(v)) for i, v in zip(ids, s, strict=True) if i != exclude),
                  key=lambda t: -t[1])


def test_redis_search_is_exact_and_follows_evictions(search_url: str) -> None:
    store = RedisStore(search_url, max_items=6, prefix="t-exact")
    try:
        x = vecs(9)
        ids = [f"id{i}" for i in range(9)]
        store.put_many(MODEL, [(i, v) for i, v in zip(ids[:5], x[:5], strict=True)],
                       [f"{i}.png" for i in ids[:5]])
        store.put_many(MODEL, [(i, v) for i, v in zip(ids[5:], x[5:], strict=True)])
        # ids 0..2 are evicted: the bound is 6
        hits = store.search(MODEL, x[4], 10, exclude="id4")
        want = cosine_ranking(x[3:], x[4], ids[3:], "id4")
        assert [h.id for h in hits] == [i for i, _ in want]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in want], atol=1e-4)
        assert {h.id: h.filename for h in hits}["id3"] == "id3.png"
        assert {h.id: h.filename for h in hits}["id6"] is None
        assert len(store.search(MODEL, x[4], 2)) == 2
        assert store.search("other-model", x[4], 3) == []
    finally:
        store.close()


def test_redis_old_layout_is_moved_and_searched(search_url: str) -> None:
    """Vectors a replica of the previous version wrote (one big hash) load and are found."""
    r = redis.Redis.from_url(search_url)
    x = vecs(3, seed=1)
    for n, v in enumerate(x):
        r.hset("{t-old}:vec", _member(MODEL, f"old{n}"), v.astype("<f4").tobytes())
        r.zadd("{t-old}:order", {_member(MODEL, f"old{n}"): n + 1})
    r.set("{t-old}:seq", 3)
    store = RedisStore(search_url, max_items=10, prefix="t-old")
    try:
        assert r.hlen("{t-old}:vec") == 0
        got = store.get_many(MODEL, ["old0", "old2"])
        np.testing.assert_array_equal(got["old2"], x[2])
        hits = store.search(MODEL, x[0], 5, exclude="old0")
        assert sorted(h.id for h in hits) == ["old1", "old2"]
        assert store.count() == 3
    finally:
        store.close()
        r.close()


async def test_plain_redis_stores_but_cannot_search(plain_url: str, served_model_dir: Path,
                                                    tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore(plain_url, max_items=10, prefix="t-plain")
    try:
        with pytest.raises(SearchUnavailable, match="search module"):
            store.search(MODEL, vecs(1)[0], 3)
    finally:
        store.close()
    settings = make_settings(served_model_dir, tmp_path, embed_store=plain_url)
    async with running(create_app(settings)) as c:
        assert "no search module" in caplog.text
        r = await c.post("/embed", files=[("file", ("a.png", png_bytes(1)))])
        assert r.status_code == 200
        image_id = r.json()["results"][0]["id"]
        assert (await c.get("/embed", params={"id": image_id})).status_code == 200
        r = await c.get("/search", params={"id": image_id})
        assert r.status_code == 501 and r.json()["error"]["code"] == "search_unavailable"
        r = await c.post("/search", files=[("file", ("a.png", png_bytes(2)))])
        assert r.status_code == 501


def test_redis_search_an_id_twice_in_one_put(search_url: str) -> None:
    """Stored once, searched once; as young as its last occurrence when the bound evicts."""
    store = RedisStore(search_url, max_items=2, prefix="t-twice")
    try:
        x = vecs(3, seed=2)
        store.put_many(MODEL, [("a", x[0]), ("b", x[1]), ("a", x[0])], ["a.png", None, None])
        assert store.count() == 2
        hits = store.search(MODEL, x[0], 10)
        assert sorted(h.id for h in hits) == ["a", "b"]
        assert {h.id: h.filename for h in hits}["a"] == "a.png"
        store.put_many(MODEL, [("c", x[2])])  # evicts b, the oldest
        assert sorted(h.id for h in store.search(MODEL, x[0], 10)) == ["a", "c"]
        assert store.filenames(MODEL, ["a", "b", "c"]) == {"a": "a.png", "c": None}
    finally:
        store.close()


def test_redis_search_index_lost_is_made_again(search_url: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A Redis restarted without persistence (or FT.DROPINDEX) loses the index, not
    necessarily the hashes: the next search makes it again instead of failing until this
    process restarts."""
    store = RedisStore(search_url, max_items=10, prefix="t-lost")
    r = redis.Redis.from_url(search_url)
    try:
        x = vecs(2, seed=3)
        store.put_many(MODEL, [("a", x[0]), ("b", x[1])])
        assert len(store.search(MODEL, x[0], 5)) == 2
        (name,) = [n for n in r.execute_command("FT._LIST") if b"t-lost" in n]
        r.execute_command("FT.DROPINDEX", name)  # the hashes stay
        assert sorted(h.id for h in store.search(MODEL, x[0], 5)) == ["a", "b"]
        assert "creating it again" in caplog.text
    finally:
        store.close()
        r.close()


def test_flat_index_is_migrated_to_hnsw(search_url: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """A store key indexed FLAT by the previous version: its index is replaced by an HNSW one
    over the same hashes when the store is next written, and nothing stored is lost."""
    r = redis.Redis.from_url(search_url)
    prefix = "{t-mig}:e:" + f"{len(MODEL)}:{MODEL}:"
    x = vecs(5, seed=3)
    for n, v in enumerate(x):
        r.hset(prefix + f"id{n}", "v", v.astype("<f4").tobytes())
        r.zadd("{t-mig}:order", {f"{len(MODEL)}:{MODEL}:id{n}": n + 1})
    r.set("{t-mig}:seq", 5)
    flat = "{t-mig}:idx:8:" + f"{len(MODEL)}:{MODEL}:"
    r.execute_command("FT.CREATE", flat, "ON", "HASH", "PREFIX", 1, prefix, "SCHEMA", "v",
                      "VECTOR", "FLAT", 6, "TYPE", "FLOAT32", "DIM", 8,
                      "DISTANCE_METRIC", "COSINE")
    store = RedisStore(search_url, max_items=10, prefix="t-mig")
    try:
        caplog.set_level("INFO", "imgrec.search")
        store.put_many(MODEL, [("id5", vecs(1, seed=4)[0])])
        assert "dropped the FLAT search index" in caplog.text
        indexes = {i.decode() if isinstance(i, bytes) else i
                   for i in r.execute_command("FT._LIST")}
        assert flat not in indexes
        (hnsw,) = [i for i in indexes if i.startswith("{t-mig}:idx:hnsw:8:")]
        assert b"HNSW" in repr(r.execute_command("FT.INFO", hnsw)).encode()
        hits = store.search(MODEL, x[0], 10, exclude="id0")
        assert sorted(h.id for h in hits) == ["id1", "id2", "id3", "id4", "id5"]
    finally:
        store.close()
        r.close()


@needs_data
def test_redis_hnsw_recall_against_exact_on_real_vectors(search_url: str) -> None:
    from app.serving.engines import OnnxRuntimeEngine
    from app.training.data import _idx_file, find_fashion_mnist, read_idx

    images = read_idx(_idx_file(find_fashion_mnist(), "t10k-images-idx3-ubyte"))[:2040]
    engine = OnnxRuntimeEngine(REPO / "models" / "fashion-mnist" / "model.onnx", threads=1)
    x = np.concatenate([engine(images[lo:lo + 255, None])[1] for lo in range(0, 2040, 255)])
    store = RedisStore(search_url, max_items=10_000, prefix="t-recall")
    try:
        ids = [f"{i:064x}" for i in range(2000)]
        for lo in range(0, 2000, 500):
            store.put_many(MODEL, list(zip(ids[lo:lo + 500], x[lo:lo + 500], strict=True)))
        hits = 0
        for q in x[2000:]:
            got = store.search(MODEL, q, 10)
            want = cosine_ranking(x[:2000], q, ids, None)[:10]
            np.testing.assert_allclose(
                [h.score for h in got if h.id in dict(want)],
                [dict(want)[h.id] for h in got if h.id in dict(want)], atol=1e-5)
            hits += len({h.id for h in got} & {i for i, _ in want})
        assert hits / (10 * 40) >= 0.95
    finally:
        store.close()
