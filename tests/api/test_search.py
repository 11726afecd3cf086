"""Similar images: POST /search and GET /search?id= against numpy's cosine, the index following
the store (restart, eviction, old files), and the index itself."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers.apps import running
from helpers.images import png_bytes

from app.main import create_app
from app.serving.request_rules import MAX_FILENAME_CHARS, clean_filename
from app.serving.store import MemoryStore, SQLiteStore
from app.serving.store.vector_index import VectorIndex
from app.settings import Settings

IMAGES = [png_bytes(seed) for seed in range(12)]
Client = httpx.AsyncClient


@pytest.fixture()
async def client(tiny_settings: Callable[..., Settings]) -> AsyncIterator[Client]:
    async with running(create_app(tiny_settings())) as c:
        yield c


async def embed_all(c: Client, blobs: list[bytes], prefix: str = "cat") -> list[str]:
    r = await c.post("/embed", files=[("file", (f"{prefix}/{i}.png", b))
                                      for i, b in enumerate(blobs)])
    assert r.status_code == 200, r.text
    return [x["id"] for x in r.json()["results"]]


async def vectors(c: Client, ids: list[str]) -> np.ndarray:
    r = await c.get("/embed", params=[("id", i) for i in ids])
    assert r.status_code == 200, r.text
    return np.array([x["embedding"] for x in r.json()["results"]], dtype=np.float64)


def expected(query: np.ndarray, ids: list[str], matrix: np.ndarray, k: int,
             exclude: str) -> list[tuple[str, float]]:
    """Brute force in float64: cosine of the query with every stored vector but itself."""
    scores = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    ranked = sorted(((i, float(s)) for i, s in zip(ids, scores, strict=True) if i != exclude),
                    key=lambda t: (-t[1], t[0]))
    return ranked[:k]


def check_neighbors(got: list[dict[str, Any]], want: list[tuple[str, float]]) -> None:
    assert [n["id"] for n in got] == [i for i, _ in want]
    np.testing.assert_allclose([n["score"] for n in got], [s for _, s in want], atol=1e-5)
    scores = [n["score"] for n in got]
    assert scores == sorted(scores, reverse=True)


async def test_post_search_one_result_per_file_in_order_scores_are_cosine(client: Client) -> None:
    ids = await embed_all(client, IMAGES[:10])
    matrix = await vectors(client, ids)
    # two stored images and one new one, in that order
    blobs = [IMAGES[3], IMAGES[7], IMAGES[10]]
    r = await client.post("/search", params={"k": 4},
                    files=[("file", ("q3.png", blobs[0])), ("file", ("q7.png", blobs[1])),
                           ("file", ("new.png", blobs[2]))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "test-fashion-small"
    results = body["results"]
    assert [x["filename"] for x in results] == ["q3.png", "q7.png", "new.png"]
    assert results[0]["id"] == ids[3] and results[1]["id"] == ids[7]
    # the new image is stored like /embed's, so the first two may find it: compare against all
    new_id = results[2]["id"]
    all_ids = [*ids, new_id]
    full = np.vstack([matrix, await vectors(client, [new_id])])
    for result, query in zip(results, full[[3, 7, 10]], strict=True):
        assert result["id"] not in [n["id"] for n in result["neighbors"]]
        check_neighbors(result["neighbors"], expected(query, all_ids, full, 4, result["id"]))
    by_id = {i: f"cat/{n}.png" for n, i in enumerate(ids)} | {new_id: "new.png"}
    for result in results:
        for n in result["neighbors"]:
            # the name stored with the vector; a re-upload under a new name renames it
            assert n["filename"] == {ids[3]: "q3.png", ids[7]: "q7.png"}.get(n["id"],
                                                                             by_id[n["id"]])


async def test_get_search_by_id_matches_numpy(client: Client) -> None:
    ids = await embed_all(client, IMAGES[:8])
    matrix = await vectors(client, ids)
    for n in (0, 5):
        r = await client.get("/search", params={"id": ids[n].upper(), "k": 3})
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result["id"] == ids[n] and result["filename"] == f"cat/{n}.png"
        check_neighbors(result["neighbors"], expected(matrix[n], ids, matrix, 3, ids[n]))
    # k larger than what is stored: everything but the query itself
    r = await client.get("/search", params={"id": ids[0], "k": 100})
    assert len(r.json()["results"][0]["neighbors"]) == 7


@pytest.mark.parametrize(("params", "status", "code"), [
    ({"id": "0" * 64}, 404, "unknown_id"),
    ({"id": "xyz"}, 422, "invalid_parameters"),
    ({}, 422, "invalid_parameters"),
    ({"id": "0" * 64, "k": 0}, 422, "invalid_parameters"),
    ({"id": "0" * 64, "k": 101}, 422, "invalid_parameters"),
    ({"id": "0" * 64, "k": "ten"}, 422, "invalid_parameters"),
])
async def test_get_search_errors(client: Client, params: dict[str, Any], status: int,
                           code: str) -> None:
    r = await client.get("/search", params=params)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


@pytest.mark.parametrize(("k", "files", "status", "code"), [
    (0, True, 422, "invalid_parameters"),
    (101, True, 422, "invalid_parameters"),
    (10, False, 400, "bad_request"),
])
async def test_post_search_errors(client: Client, k: int, files: bool, status: int,
                            code: str) -> None:
    kw: dict[str, Any] = {"files": [("file", ("a.png", IMAGES[0]))]} if files else \
        {"content": b"x", "headers": {"content-type": "text/plain"}}
    r = await client.post("/search", params={"k": k}, **kw)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


async def test_post_search_not_an_image_is_415_and_the_service_goes_on(client: Client) -> None:
    r = await client.post("/search", files=[("file", ("a.txt", b"not an image"))])
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_image"
    assert (await client.post("/search", files=[("file", ("a.png", IMAGES[0]))])).status_code == 200


async def test_only_image_stored_has_no_neighbors(client: Client) -> None:
    r = await client.post("/search", files=[("file", ("only.png", IMAGES[0]))])
    assert r.status_code == 200
    assert r.json()["results"][0]["neighbors"] == []


async def test_filename_is_sanitised_and_bounded(client: Client) -> None:
    long = "x" * 400 + ".png"
    r = await client.post("/embed", files=[("file", ("evil\x1b[31m\u202ename.png", IMAGES[0])),
                                     ("file", (long, IMAGES[1]))])
    a, b = (x["id"] for x in r.json()["results"])
    r = await client.get("/search", params={"id": a})
    assert r.json()["results"][0]["filename"] == "evil[31mname.png"
    assert r.json()["results"][0]["neighbors"][0]["filename"] == long[:MAX_FILENAME_CHARS]


async def test_index_survives_restart(tiny_settings: Callable[..., Settings]) -> None:
    settings = tiny_settings()
    async with running(create_app(settings)) as c:
        ids = await embed_all(c, IMAGES[:6])
        before = (await c.get("/search", params={"id": ids[2], "k": 5})).json()
    async with running(create_app(settings)) as c:
        after = (await c.get("/search", params={"id": ids[2], "k": 5})).json()
    assert after == before and len(after["results"][0]["neighbors"]) == 5


async def test_evicted_vectors_leave_the_index(tiny_settings: Callable[..., Settings]) -> None:
    settings = tiny_settings(embed_store_max_items=4)
    async with running(create_app(settings)) as c:
        ids = await embed_all(c, IMAGES[:6])  # the first two are evicted
        r = await c.get("/search", params={"id": ids[5], "k": 10})
        found = {n["id"] for n in r.json()["results"][0]["neighbors"]}
        assert found == set(ids[2:5])
        assert (await c.get("/search", params={"id": ids[0]})).status_code == 404
    async with running(create_app(settings)) as c:  # and stay out after a restart
        r = await c.get("/search", params={"id": ids[5], "k": 10})
        found = {n["id"] for n in r.json()["results"][0]["neighbors"]}
        assert found == set(ids[2:5])


async def test_memory_store_searches(tiny_settings: Callable[..., Settings]) -> None:
    settings = tiny_settings(embed_store="memory", embed_store_max_items=3)
    async with running(create_app(settings)) as c:
        ids = await embed_all(c, IMAGES[:4])
        r = await c.get("/search", params={"id": ids[3]})
        found = [n["id"] for n in r.json()["results"][0]["neighbors"]]
        assert sorted(found) == sorted(ids[1:3])


def test_sqlite_file_without_filenames_still_loads(tmp_path: Path) -> None:
    """A store file written before filenames were kept: its vectors load and are searched."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE embeddings (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
               " model TEXT NOT NULL, id TEXT NOT NULL, vector BLOB NOT NULL, UNIQUE (model, id))")
    vecs = np.eye(3, 4, dtype="<f4") + 0.1
    db.executemany("INSERT INTO embeddings (model, id, vector) VALUES ('m', ?, ?)",
                   [(f"id{i}", v.tobytes()) for i, v in enumerate(vecs)])
    db.commit()
    db.close()
    store = SQLiteStore(path, 10)
    try:
        hits = store.search("m", vecs[0], 5, exclude="id0")
        assert [h.filename for h in hits] == [None, None]
        assert {h.id for h in hits} == {"id1", "id2"}
        store.put_many("m", [("id3", vecs[0] * 2)], ["new.png"])
        top = store.search("m", vecs[0], 1, exclude="id0")[0]
        assert (top.id, top.filename) == ("id3", "new.png")
        assert top.score == pytest.approx(1.0, abs=1e-6)
        # a re-put without a filename keeps the stored one
        store.put_many("m", [("id3", vecs[0] * 2)])
        assert store.filenames("m", ["id3", "id0"]) == {"id3": "new.png", "id0": None}
    finally:
        store.close()


def test_vector_index_exact_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    index = VectorIndex()
    ids = [f"{i:04d}" for i in range(500)]
    index.add("m", ids, x, [f"f{i}" for i in range(500)])
    gone = set(ids[::3])  # removal moves rows around: the rest must still be found right
    index.remove([("m", i) for i in gone])
    index.remove([("m", "unknown"), ("other", "0001")])
    keep = [n for n, i in enumerate(ids) if i not in gone]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for q in rng.standard_normal((20, 16)).astype(np.float32):
        hits = index.search("m", q, 7)
        scores = unit[keep] @ (q / np.linalg.norm(q))
        want = [ids[keep[n]] for n in np.argsort(-scores)[:7]]
        assert [h.id for h in hits] == want
        np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:7],
                                   atol=1e-5)
        assert all(h.filename == f"f{int(h.id)}" for h in hits)
    assert len(index) == len(keep)
    assert index.search("other", x[0], 3) == []
    assert index.search("m", np.zeros(16, np.float32), 3)[0].score == 0.0


def test_memory_store_evictions_leave_the_index() -> None:
    store = MemoryStore(2)
    store.put_many("m", [("a", np.ones(4)), ("b", np.ones(4)), ("c", np.ones(4))],
                   ["a.png", None, "c.png"])
    assert {h.id for h in store.search("m", np.ones(4), 10)} == {"b", "c"}
    assert store.filenames("m", ["a", "b", "c"]) == {"b": None, "c": "c.png"}


@pytest.mark.parametrize(("raw", "clean"), [
    (None, None), ("", None), ("  \x00\n ", None), ("a/b.png", "a/b.png"),
    ("x\u200by.png", "xy.png"), ("é.png", "é.png"),
])
def test_clean_filename(raw: str | None, clean: str | None) -> None:
    assert clean_filename(raw) == clean


async def test_search_stays_in_the_callers_namespace(tiny_settings: Callable[..., Settings],
                                                     tmp_path: Path) -> None:
    key_a, key_b = "alice-0123456789abcdef-AAAA", "bob-fedcba9876543210-BBBBBB"
    (tmp_path / "keys").write_text(f"{key_a}\n{key_b}\n")
    settings = tiny_settings(api_keys_file=tmp_path / "keys")
    a, b = ({"Authorization": f"Bearer {k}"} for k in (key_a, key_b))
    async with running(create_app(settings)) as c:
        r = await c.post("/embed", headers=a, files=[("file", (f"{n}.png", IMAGES[n]))
                                               for n in range(3)])
        ids = [x["id"] for x in r.json()["results"]]
        assert (await c.get("/search", params={"id": ids[0]})).status_code == 401
        assert (await c.post("/search", files=[("file", ("q.png", IMAGES[5]))])).status_code == 401
        # B sees none of A's images, nor can it search by A's ids
        r = await c.post("/search", headers=b, files=[("file", ("q.png", IMAGES[5]))])
        assert r.status_code == 200 and r.json()["results"][0]["neighbors"] == []
        assert (await c.get("/search", headers=b, params={"id": ids[0]})).status_code == 404
        r = await c.post("/search", headers=a, files=[("file", ("q.png", IMAGES[6]))])
        assert {n["id"] for n in r.json()["results"][0]["neighbors"]} == set(ids)
