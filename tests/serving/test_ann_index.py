"""The SQLite store's approximate index (app/serving/store/ann_*.py) on real feature vectors of
the shipped model: recall against exact search, exact scores, a restart that loads the snapshot
and replays the rows after it, corrupt and stale snapshots rebuilt while searches stay exact,
evictions and re-puts leaving the graph, and a stored vector searchable within a second of its
/embed response."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers.apps import running
from helpers.data import needs_data
from helpers.images import png_bytes

from app.main import create_app
from app.serving.engines import OnnxRuntimeEngine
from app.serving.store import SQLiteStore
from app.serving.store.ann_index import AnnParams
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MODEL = "m" * 64
N, QUERIES = 2400, 60


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    """Feature vectors of the shipped model for N + QUERIES Fashion-MNIST test images (about a
    second of ONNX Runtime)."""
    from app.training.data import _idx_file, find_fashion_mnist, read_idx

    images = read_idx(_idx_file(find_fashion_mnist(), "t10k-images-idx3-ubyte"))[:N + QUERIES]
    engine = OnnxRuntimeEngine(REPO / "models" / "fashion-mnist" / "model.onnx", threads=1)
    return np.concatenate([engine(images[lo:lo + 256, None])[1]
                           for lo in range(0, len(images), 256)])


def ids(n: int, start: int = 0) -> list[str]:
    return [f"{i:064x}" for i in range(start, start + n)]


def fill(store: SQLiteStore, x: np.ndarray, start: int = 0, model: str = MODEL) -> list[str]:
    names = ids(len(x), start)
    for lo in range(0, len(x), 500):
        store.put_many(model, list(zip(names[lo:lo + 500], x[lo:lo + 500], strict=True)),
                       [f"{n}.png" for n in names[lo:lo + 500]])
    return names


def exact(x: np.ndarray, names: list[str], q: np.ndarray, k: int) -> list[tuple[str, float]]:
    s = (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    return sorted(zip(names, s.tolist(), strict=True), key=lambda t: (-t[1], t[0]))[:k]


def check_exact_scores(store: SQLiteStore, x: np.ndarray, names: list[str],
                       queries: np.ndarray) -> float:
    """Every score is the exact cosine, best first; returns recall@10 against exact kNN."""
    by_id = dict(zip(names, x, strict=True))
    hits = 0
    for q in queries:
        got = store.search(MODEL, q, 10)
        want = exact(x, names, q, 10)
        assert len(got) == 10
        for n in got:
            v = by_id[n.id]
            assert n.score == pytest.approx(float(v @ q / np.linalg.norm(v) /
                                                  np.linalg.norm(q)), abs=1e-5)
            assert n.filename == f"{n.id}.png"
        assert [(-n.score, n.id) for n in got] == sorted((-n.score, n.id) for n in got)
        hits += len({n.id for n in got} & {i for i, _ in want})
    return hits / (10 * len(queries))


@needs_data
def test_recall_against_exact_on_real_vectors(real: np.ndarray, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "e.sqlite3", 10_000)
    try:
        x, queries = real[:N], real[N:]
        names = fill(store, x)
        other = fill(store, x[:50] * 2, start=10**6, model="another-model")
        assert store.wait_indexed(60)
        assert store.index is not None and len(store.index) == N + 50
        # all rows are in the graph: these searches are the index's candidates, re-scored
        assert check_exact_scores(store, x, names, queries) >= 0.95
        # a store key's search never returns another's vectors
        found = {n.id for q in queries[:10] for n in store.search(MODEL, q, 10)}
        assert not found & set(other)
    finally:
        store.close()


@needs_data
def test_restart_loads_the_snapshot_and_replays_rows_after_it(
        real: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "e.sqlite3"
    store = SQLiteStore(path, 10_000)
    names = fill(store, real[:1500])
    assert store.wait_indexed(60)
    store.close()  # saves the snapshot
    # rows written while no index ran (another process, or a crash before the index caught
    # up): in the table after the snapshot's watermark, and some rows it holds deleted
    writer = SQLiteStore(path, 1500, ann=False)
    names = names[100:] + fill(writer, real[1500:1600], start=1500)
    writer.close()
    caplog.clear()
    caplog.set_level(logging.INFO, "imgrec.index")
    store = SQLiteStore(path, 10_000)
    try:
        assert "loaded the search index snapshot" in caplog.text
        assert "rebuilding" not in caplog.text
        assert store.index is not None and len(store.index) == 1500  # before any catch-up
        x = real[100:1600]
        # the replayed rows are found at once (the exact scan of the rows after the watermark)
        assert check_exact_scores(store, x, names, real[1550:1560]) >= 0.95
        assert store.wait_indexed(30)
        assert len(store.index) == 1500  # 100 replayed in, the 100 deleted ones out
        assert set(store.index.keys(MODEL).tolist()) == set(range(101, 1601))
        assert check_exact_scores(store, x, names, real[N:N + 20]) >= 0.95
    finally:
        store.close()


def _one_part(path: Path) -> Path:
    manifest = json.loads((Path(str(path) + ".ann") / "manifest.json").read_text())
    (part,) = manifest["parts"].values()
    return Path(str(path) + ".ann") / part["file"]


@needs_data
@pytest.mark.parametrize("damage", ["flipped byte", "truncated manifest", "other store",
                                    "other parameters"])
def test_corrupt_or_stale_snapshot_is_rebuilt_and_search_stays_exact(
        real: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        damage: str) -> None:
    path = tmp_path / "e.sqlite3"
    store = SQLiteStore(path, 10_000)
    names = fill(store, real[:800])
    assert store.wait_indexed(60)
    store.close()
    caplog.clear()
    params = None
    if damage == "flipped byte":
        part = _one_part(path)
        blob = bytearray(part.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        part.write_bytes(bytes(blob))
        why = "fails its checksum"
    elif damage == "truncated manifest":
        manifest = Path(str(path) + ".ann") / "manifest.json"
        manifest.write_text(manifest.read_text()[:40])
        why = "corrupt manifest"
    elif damage == "other store":  # the snapshot of another file with the same rows
        other = tmp_path / "other.sqlite3"
        shutil.copytree(Path(str(path) + ".ann"), Path(str(other) + ".ann"))
        writer = SQLiteStore(other, 10_000, ann=False)
        fill(writer, real[:800])
        writer.close()
        path, why = other, "made for another store file"
    else:
        params, why = AnnParams(connectivity=8), "stale snapshot: made with"
    caplog.set_level(logging.INFO, "imgrec.index")
    store = SQLiteStore(path, 10_000, ann_params=params)
    try:
        assert why in caplog.text and "rebuilding it from the store" in caplog.text
        # searched exactly while the graph is rebuilt, and after
        want = [exact(real[:800], names, q, 10) for q in real[N:N + 5]]
        got = [[(n.id, n.score) for n in store.search(MODEL, q, 10)] for q in real[N:N + 5]]
        for g, w in zip(got, want, strict=True):
            assert [i for i, _ in g] == [i for i, _ in w]
        assert store.wait_indexed(60)
        assert store.index is not None and len(store.index) == 800
    finally:
        store.close()


def test_evicted_and_replaced_rows_leave_the_graph(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((1300, 16)).astype(np.float32)
    store = SQLiteStore(tmp_path / "e.sqlite3", 1000)
    try:
        names = fill(store, x)  # the first 300 are evicted
        store.put_many(MODEL, [(names[500], -x[500])])  # a re-put: a new row, the old one goes
        assert store.wait_indexed(30)
        assert store.index is not None and len(store.index) == 1000
        keys = set(store.index.keys(MODEL).tolist())
        assert max(keys) == 1301 and 501 not in keys and min(keys) == 301
        hits = store.search(MODEL, x[10], 100)
        assert not {h.id for h in hits} & set(names[:300])
        assert store.search(MODEL, -x[500], 1)[0].id == names[500]
    finally:
        store.close()


async def test_stored_vector_is_searchable_within_a_second_of_its_response(
        tiny_settings: Callable[..., Settings]) -> None:
    app = create_app(tiny_settings())
    async with running(app) as c:
        r = await c.post("/embed", files=[("file", (f"{n}.png", png_bytes(n))) for n in range(8)])
        assert r.status_code == 200
        first = r.json()["results"][0]["id"]
        r = await c.post("/embed", files=[("file", ("late.png", png_bytes(99)))])
        late = r.json()["results"][0]["id"]
        store = app.state.service.store.store
        # in the graph within a second of the response (an event, not a sleep)...
        assert store.wait_indexed(1.0)
        # ...and found by search right away, through the index or the exact tail
        r = await c.get("/search", params={"id": first, "k": 100})
        assert late in [n["id"] for n in r.json()["results"][0]["neighbors"]]
