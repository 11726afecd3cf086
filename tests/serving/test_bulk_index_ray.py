"""`imgrec index SOURCE --ray`: the Ray Data pipeline.

Fast tests call the stages, the listing, the sizing and the writer directly (no Ray). The slow
ones run real Ray: a local Ray of the test module's own (2 CPUs, a small object store) that
in-process runs use, and subprocesses that start a Ray of their own or join that one by
address; their figures come from the JSON line on stdout. Only local paths are read here:
pyarrow's S3 and GCS filesystems are the same code path (fs.open_input_stream), untested for
want of an object store on this machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes
from helpers.apps import running
from helpers.daemons import Daemon, start_redis, wait_until
from PIL import Image

from app.api.auth import namespace_of_key
from app.cli import main
from app.main import create_app
from app.model.directory import read_card
from app.serving import upload_checks
from app.serving.predictor import Predictor
from app.serving.ray_index import stages
from app.serving.ray_index.pipeline import plan
from app.serving.ray_index.report import Classifier
from app.serving.ray_index.source import SourceError, list_source
from app.serving.store_key import model_key, store_key
from app.settings import DEFAULT_MODEL_DIR, Settings

ROOT = Path(__file__).resolve().parents[2]
CARD = read_card(DEFAULT_MODEL_DIR)
KEY = model_key(CARD, "float32")


def jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_tree(root: Path, n: int = 6) -> dict[str, bytes]:
    """An ImageFolder tree of good images (PNG and JPEG), plus a copy with the same bytes under
    another name, two broken files and a text file the listing leaves out."""
    good = {f"{label}/{i}.{'jpg' if i % 3 == 0 else 'png'}":
            jpeg_bytes(100 * k + i) if i % 3 == 0 else png_bytes(100 * k + i)
            for k, label in enumerate(["bag", "coat"]) for i in range(n)}
    for rel, data in {**good, "coat/copy-of-0.png": good["bag/1.png"]}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "coat" / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return good


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- fast: no Ray ------------------------------------------------------------------------------

def test_sources_folder_listing_and_uri(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    good = make_tree(tree)
    folder = list_source(str(tree))
    names = [*sorted(good), "bag/broken.png", "coat/copy-of-0.png", "coat/empty.jpg"]
    assert sorted(folder.filenames) == sorted(names)  # notes.txt: not an image extension
    assert folder.paths == sorted(folder.paths) and folder.what == "folder"
    assert folder.sizes[folder.filenames.index("coat/empty.jpg")] == 0
    # the same folder as a file:// URI
    assert list_source(tree.as_uri()).filenames == folder.filenames
    # a listing: relative lines from the listing's folder, absolute ones as they are, any name
    listing = tmp_path / "list.txt"
    listing.write_text(f"# catalogue\ntree/bag/1.png\n\n{tree / 'coat/2.png'}\ntree/notes.txt\n")
    got = list_source(str(listing))
    assert got.what == "listing"
    assert got.filenames == ["tree/bag/1.png", str(tree / "coat/2.png"), "tree/notes.txt"]
    assert got.paths == [str(tree / "bag/1.png"), str(tree / "coat/2.png"),
                         str(tree / "notes.txt")]
    with pytest.raises(SourceError, match="no such folder or file"):
        list_source(str(tmp_path / "missing"))
    with pytest.raises(SourceError):
        list_source("nosuchscheme://bucket/x")


def table(paths: list[Path], names: list[str]) -> pa.Table:
    return pa.table({"path": [str(p) for p in paths], "filename": names,
                     "size": pa.array([p.stat().st_size if p.exists() else -1 for p in paths],
                                      pa.int64())})


def test_stages_skip_stored_ids_before_decoding_and_report_why_files_fail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"a.png": png_bytes(1), "b.png": png_bytes(2), "big.png": png_bytes(3, size=64),
             "bad.png": b"\x89PNG nope"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [tmp_path / n for n in [*files, "gone.png"]]
    asked: list[list[str]] = []

    def lookup(key: str, ids: list[str], with_vectors: bool) -> dict[str, bytes]:
        asked.append(ids)
        return {sha(files["b.png"]): b"\x00" * 8} if sha(files["b.png"]) in ids else {}

    decoded: list[int] = []
    real = upload_checks.prepare

    def counting(data: bytes, *a: Any) -> bytes:
        decoded.append(len(data))
        return real(data, *a)

    monkeypatch.setattr(stages, "prepare", counting)
    limit = len(files["big.png"]) - 1  # an upload of its size would be refused (413)
    out = stages.read_and_decode(table(paths, [p.name for p in paths]), pafs.LocalFileSystem(),
                                 limit, KEY, lookup, True, CARD.input, 50_000_000, 210_000_000)
    rows = {r["filename"]: r for r in out.to_pylist()}
    assert rows["a.png"]["status"] == "new" and len(rows["a.png"]["pixels"]) == 28 * 28
    assert rows["a.png"]["id"] == sha(files["a.png"])
    assert rows["b.png"]["status"] == "skipped" and rows["b.png"]["vector"] == b"\x00" * 8
    assert rows["big.png"]["reason"].startswith("too_large")
    assert rows["bad.png"]["reason"].startswith("unsupported_image")
    assert rows["gone.png"]["reason"].startswith("read_error")
    assert decoded == [len(files["a.png"]), len(files["bad.png"])]  # b.png never decoded
    assert asked == [[sha(files[n]) for n in ("a.png", "b.png", "bad.png")]]

    predictor = Predictor.from_settings(Settings(device="cpu"))
    done = stages.embed(out, predictor.forward, CARD.labels).to_pylist()
    (a,) = [r for r in done if r["filename"] == "a.png"]
    (want,) = predictor.forward([real(files["a.png"], CARD.input, 50_000_000)])
    np.testing.assert_array_equal(np.frombuffer(a["vector"], "<f4"), want.embedding)
    assert a["label"] == CARD.labels[int(np.argmax(want.probs))]
    assert a["score"] == pytest.approx(float(want.probs.max()))
    assert [r["label"] for r in done if r["status"] != "new"] == [None] * 4
    # the classifier that labels vectors stored by an earlier run agrees with the network
    labels, scores = Classifier(DEFAULT_MODEL_DIR, CARD)(want.embedding[None])
    assert labels == [a["label"]] and scores[0] == pytest.approx(a["score"], rel=1e-4)


def test_the_writer_stores_each_id_once(tmp_path: Path) -> None:
    writer = stages.StoreWriter(str(tmp_path / "s.sqlite3"), 100)
    v = [np.full(4, n, np.float32).tobytes() for n in range(3)]
    try:
        assert writer.put("m", ["x", "y", "x"], [v[0], v[1], v[2]], ["x.png", "y.png", "x2"]) \
            == ["x", "y"]
        assert writer.put("m", ["y", "z"], [v[1], v[2]], ["again", "z.png"]) == ["z"]
        assert writer.known("m", ["x", "q"], False) == {"x": b""}
        assert writer.known("m", ["x"], True) == {"x": v[0]}
        assert writer.count() == 3
        assert writer.store.filenames("m", ["x", "y"]) == {"x": "x.png", "y": "y.png"}
    finally:
        writer.close()


def test_the_shipped_model_directory_is_one_per_content(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    files = stages.model_files(DEFAULT_MODEL_DIR)
    assert set(files) == {"card.json", "weights.safetensors", "model.onnx", "model.int8.onnx",
                          "calibration.safetensors"}
    first = stages.materialise(files)
    assert stages.materialise(dict(files)) == first
    assert (first / "model.onnx").read_bytes() == (DEFAULT_MODEL_DIR / "model.onnx").read_bytes()
    # the same weights with another int8 graph (a re-quantisation): another directory
    other = stages.materialise({**files, "model.int8.onnx": b"another graph"})
    assert other != first and other.parent == first.parent == tmp_path / "imgrec-models"
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, other.name])


def test_actors_are_sized_to_the_cluster() -> None:
    cpu = Settings(device="auto")
    assert plan({"CPU": 8.0}, cpu) == plan({"CPU": 8.0, "GPU": 0.0}, cpu)
    p = plan({"CPU": 8.0}, cpu)
    assert (p.actors, p.cpus_per_actor, p.on_gpu) == (8, 1.0, False)
    assert plan({"CPU": 8.0}, cpu, decode_tasks=True).actors == 7
    assert plan({"CPU": 8.0}, cpu.model_copy(update={"torch_threads": 4})).actors == 2
    gpu = plan({"CPU": 32.0, "GPU": 4.0}, cpu)
    assert (gpu.actors, gpu.gpus_per_actor, gpu.decode_tasks) == (4, 1.0, True)
    # the int8 graph and device=cpu run on CPUs whatever the cluster has
    assert not plan({"CPU": 8.0, "GPU": 4.0}, cpu.model_copy(update={"precision": "int8"})).on_gpu
    assert not plan({"CPU": 8.0, "GPU": 4.0}, Settings(device="cpu")).on_gpu
    with pytest.raises(ValueError, match="no GPU"):
        plan({"CPU": 8.0}, Settings(device="cuda"))


@pytest.mark.parametrize("argv, message", [
    (["--ray", "--shard", "0/2"], "--shard: not with --ray"),
    (["--ray", "./catalogue/"], "expected auto"),
    (["--ray", "auto", "--num-cpus", "2"], "size a local Ray"),
    (["--report", "r.jsonl"], "only with --ray"),
])
def test_usage_errors(tmp_path: Path, argv: list[str], message: str,
                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["index", str(tmp_path), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_listing_or_uri_needs_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(SystemExit):
        main(["index", str(tmp_path / "list.txt")])
    assert "needs --ray" in capsys.readouterr().err


def test_an_empty_catalogue_starts_no_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    index_env(monkeypatch, str(tmp_path / "emb.sqlite3"))
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty"), "--ray", "--no-progress"]) == 0
    figures = json_line(capsys.readouterr().out)
    assert (figures["files"], figures["stored"], figures["images_per_s"]) == (0, 0, 0.0)
    assert not ray.is_initialized()


# -- slow: real Ray ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray of this module's own: 2 CPUs, a 128 MB object store, no dashboard."""
    import ray

    context = ray.init(address="local", num_cpus=2, object_store_memory=128 * 2**20,
                       include_dashboard=False, logging_level="WARNING")
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def index_env(monkeypatch: pytest.MonkeyPatch, store: str) -> None:
    for name, value in {"IMGREC_EMBED_STORE": store, "IMGREC_DEVICE": "cpu",
                        "IMGREC_MODEL_DIR": str(DEFAULT_MODEL_DIR)}.items():
        monkeypatch.setenv(name, value)
    for name in ("IMGREC_ENGINE", "IMGREC_PRECISION", "IMGREC_MAX_UPLOAD_BYTES"):
        monkeypatch.delenv(name, raising=False)


def json_line(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, out
    figures: dict[str, Any] = json.loads(lines[-1])
    return figures


def app_settings(store: str, **kw: Any) -> Settings:
    return Settings(model_dir=DEFAULT_MODEL_DIR, device="cpu", engine="auto", warmup_batches=1,
                    embed_store=store, **kw)


@pytest.mark.slow
async def test_a_tree_with_broken_files_then_embed_and_search_agree(
        ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "catalogue"
    good = make_tree(tree)
    store = str(tmp_path / "emb.sqlite3")
    index_env(monkeypatch, store)
    argv = ["index", str(tree), "--ray", "--no-progress", "--batch-size", "4",
            "--parquet", str(tmp_path / "v.parquet"), "--report", str(tmp_path / "bad.jsonl")]
    assert main(argv) == 0
    out = capsys.readouterr()
    first = json_line(out.out)
    # 12 images; the copy has the same bytes as bag/1.png: one image, skipped; two broken
    assert {k: first[k] for k in ("files", "stored", "skipped", "failed")} == \
        {"files": 15, "stored": 12, "skipped": 1, "failed": 2}
    assert first["store_key"] == KEY and first["images_per_s"] > 0
    assert "indexed 12 images, 1 already stored, 2 unreadable, of 15 files" in out.err
    report = {r["filename"]: r for r in map(json.loads, (tmp_path / "bad.jsonl").open())}
    assert set(report) == {"bag/broken.png", "coat/empty.jpg"}
    assert report["coat/empty.jpg"]["reason"] == "unsupported_image: empty file"
    assert report["bag/broken.png"]["path"] == str(tree / "bag/broken.png")

    rows = pq.read_table(tmp_path / "v.parquet")
    assert rows.schema.names == ["id", "filename", "label", "score", "vector"]
    assert rows.schema.field("vector").type == pa.list_(pa.float32(), CARD.embedding_dim)
    parquet = {r["filename"]: r for r in rows.to_pylist()}
    assert set(parquet) == set(good) | {"coat/copy-of-0.png"}  # a row per stored file
    assert all(parquet[n]["id"] == sha(data) for n, data in good.items())
    assert parquet["coat/copy-of-0.png"]["vector"] == parquet["bag/1.png"]["vector"]
    assert {r["label"] for r in parquet.values()} <= set(CARD.labels)

    async with running(create_app(app_settings(store))) as c:
        # what was stored is what /embed computes for the same bytes, under the same ids
        ids = [sha(data) for data in good.values()]
        r = await c.get("/embed", params=[("id", i) for i in ids])
        assert r.status_code == 200, r.text
        stored = [x["embedding"] for x in r.json()["results"]]
        r = await c.post("/embed", files=[("file", (n, d)) for n, d in good.items()])
        computed = r.json()["results"]
        assert [x["id"] for x in computed] == ids
        for name, s, x in zip(good, stored, computed, strict=True):
            np.testing.assert_allclose(s, x["embedding"], rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(parquet[name]["vector"], x["embedding"], rtol=1e-5,
                                       atol=1e-6, err_msg=name)
        # search by photo: every indexed image comes back, under its path in the tree
        r = await c.post("/search", params={"k": 50},
                         files=[("file", ("photo.png", png_bytes(999)))])
        assert r.status_code == 200, r.text
        found = {n["filename"] for n in r.json()["results"][0]["neighbors"]}
        assert found == set(good)  # (copy-of-0 is bag/1.png's bytes: one image, one name)
        r = await c.get("/search", params={"id": sha(good["coat/2.png"]), "k": 1})
        assert r.json()["results"][0]["filename"] == "coat/2.png"

    # a rerun decodes nothing and stores nothing; its Parquet still has every stored file,
    # labelled by the classifier from the stored vectors
    assert main([*argv[:-4], "--parquet", str(tmp_path / "again.parquet")]) == 0
    again = json_line(capsys.readouterr().out)
    assert {k: again[k] for k in ("files", "stored", "skipped", "failed")} == \
        {"files": 15, "stored": 0, "skipped": 13, "failed": 2}
    rerun = {r["filename"]: r for r in pq.read_table(tmp_path / "again.parquet").to_pylist()}
    assert set(rerun) == set(parquet)
    for name, row in parquet.items():
        assert rerun[name]["label"] == row["label"], name
        assert rerun[name]["score"] == pytest.approx(row["score"], rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(rerun[name]["vector"], row["vector"], rtol=1e-6)


def stored_rows(store: Path) -> dict[str, int]:
    """id -> seq (the row's insertion number: a rewrite would change it)."""
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return dict(db.execute("SELECT id, seq FROM embeddings").fetchall())
    except sqlite3.OperationalError:  # not created yet
        return {}


def kill_session(leader: subprocess.Popen[str]) -> None:
    """SIGKILL the run and every process of its session (its local Ray: raylet, GCS, workers):
    the machine-crash case, nothing cleaned up."""
    members = [pid for pid in _pids() if _session(pid) == leader.pid]
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    leader.wait(timeout=10)
    wait_until(lambda: not [p for p in members if _session(p) == leader.pid], 20,
               "the killed run's processes to go")


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


@pytest.mark.slow
def test_a_run_killed_half_way_resumes_and_stores_every_file_once(
        ray_address: str, tmp_path: Path) -> None:
    tree = tmp_path / "catalogue"
    tree.mkdir()
    n = 1200  # 5 batches of the actors' 256 rows, over 2 actors: a kill between two writes
    blobs = {f"{i:03d}.png": png_bytes(10_000 + i) for i in range(n)}
    for name, data in blobs.items():
        (tree / name).write_bytes(data)
    listing = tmp_path / "catalogue.txt"  # SOURCE as a listing of paths, this time
    listing.write_text("".join(f"catalogue/{name}\n" for name in blobs))
    store = tmp_path / "emb.sqlite3"
    env = {**os.environ, "IMGREC_EMBED_STORE": str(store), "IMGREC_DEVICE": "cpu",
           "IMGREC_MODEL_DIR": str(DEFAULT_MODEL_DIR), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "app.cli", "index", str(listing), "--no-progress",
               "--batch-size", "2"]
    # 1: a Ray of its own, killed (with that Ray) once some batches are stored
    first = subprocess.Popen([*command, "--ray", "--num-cpus", "2"], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        wait_until(lambda: len(stored_rows(store)) > 0 or first.poll() is not None, 240,
                   "the first run to store some vectors", interval_s=0.02)
    finally:
        kill_session(first)
    before = stored_rows(store)
    assert 0 < len(before) < n, (len(before), first.stdout.read()[-3000:] if first.stdout
                                 else "")
    # 2: joins the module's running Ray ('auto' finds it through RAY_ADDRESS)
    second = subprocess.run([*command, "--ray", "auto"], env={**env, "RAY_ADDRESS": ray_address},
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    figures = json_line(second.stdout)
    assert figures["files"] == n and figures["failed"] == 0
    assert figures["skipped"] == len(before) and figures["stored"] == n - len(before)
    after = stored_rows(store)
    assert set(after) == {sha(d) for d in blobs.values()}  # every file, once (ids are unique)
    assert {i: after[i] for i in before} == before  # rows stored before the kill: not rewritten


@pytest.fixture(scope="module")
def search_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    daemon: Daemon | None = None
    try:
        daemon, url = start_redis(tmp_path_factory.mktemp("redis-ray"), search=True)
        yield url
    finally:
        if daemon is not None:
            daemon.stop()


@pytest.mark.slow
async def test_into_the_shared_redis_store_under_a_keys_namespace(
        ray_address: str, search_redis: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "catalogue"
    good = make_tree(tree, n=3)
    api_key = "test-key-for-the-ray-index-0123"
    (tmp_path / "keys").write_text(api_key + "\n")
    namespace = namespace_of_key(api_key)
    index_env(monkeypatch, search_redis)
    assert main(["index", tree.as_uri(), "--ray", "--no-progress", "--namespace",
                 namespace]) == 0
    figures = json_line(capsys.readouterr().out)
    assert (figures["stored"], figures["skipped"], figures["failed"]) == (6, 1, 2)
    assert figures["store_key"] == store_key(KEY, namespace)

    settings = app_settings(search_redis, api_keys_file=tmp_path / "keys")
    auth = {"authorization": f"Bearer {api_key}"}
    async with running(create_app(settings)) as c:
        image_id = sha(good["coat/1.png"])
        r = await c.get("/search", params={"id": image_id, "k": 10}, headers=auth)
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result["filename"] == "coat/1.png"
        assert {n["filename"] for n in result["neighbors"]} == set(good) - {"coat/1.png"}
        r = await c.post("/embed", files=[("file", ("x.png", good["coat/1.png"]))],
                         headers=auth)
        mine = r.json()["results"][0]["embedding"]
        r = await c.get("/embed", params={"id": image_id}, headers=auth)
        np.testing.assert_allclose(r.json()["results"][0]["embedding"], mine, rtol=1e-5,
                                   atol=1e-6)
