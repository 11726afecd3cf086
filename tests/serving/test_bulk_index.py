"""`imgrec index DIR`: a small ImageFolder tree into the store, resumable, sharded, Parquet;
then a served /search finds what it indexed under the same ids and filenames, and a server of
the same precision reads the vectors it would have computed itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes
from fastapi.testclient import TestClient

from app.cli import main
from app.main import create_app
from app.model.directory import read_card
from app.serving.bulk_index import in_shard, list_images
from app.serving.predictor import Predictor
from app.serving.store_key import model_key, store_key
from app.settings import DEFAULT_MODEL_DIR, Settings


def make_tree(root: Path) -> dict[str, bytes]:
    files = {f"{label}/{n}.png": png_bytes(10 * i + n)
             for i, label in enumerate(["bag", "coat"]) for n in range(4)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "notes.txt").write_text("not an image")
    (root / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return files


def test_index_then_search(tiny_model_dir: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "catalogue"
    files = make_tree(tree)
    store = str(tmp_path / "emb.sqlite3")
    monkeypatch.setenv("IMGREC_EMBED_STORE", store)
    monkeypatch.setenv("IMGREC_DEVICE", "cpu")
    monkeypatch.setenv("IMGREC_ENGINE", "torch")  # no ONNX export per run: faster here
    base = ["index", str(tree), "--model-dir", str(tiny_model_dir), "--batch-size", "3",
            "--no-progress"]
    # two shards of two "machines" add up to the whole catalogue
    assert main([*base, "--shard", "0/2"]) == 0
    first = capsys.readouterr().err
    assert main([*base, "--shard", "1/2", "--parquet", str(tmp_path / "v.parquet")]) == 0
    second = capsys.readouterr().err
    assert "1 unreadable" in first + second
    # resumable: everything is stored now, so a full run embeds nothing
    assert main([*base, "--parquet", str(tmp_path / "all.parquet")]) == 0
    assert "indexed 0 images, 8 already stored, 1 unreadable" in capsys.readouterr().err
    table = pq.read_table(tmp_path / "all.parquet").to_pydict()
    assert sorted(table["filename"]) == sorted(files)

    settings = Settings(model_dir=tiny_model_dir, device="cpu", warmup_batches=1,
                        embed_store=store, engine="torch")
    with TestClient(create_app(settings)) as c:
        # the service computes the same id and vector for the same bytes
        r = c.post("/embed", files=[("file", ("x.png", files["coat/2.png"]))])
        served = r.json()["results"][0]
        row = table["id"].index(served["id"])
        np.testing.assert_allclose(table["vector"][row], served["embedding"], rtol=1e-5,
                                   atol=1e-6)
        # search by photo: the catalogue's images come back with their paths
        r = c.post("/search", params={"k": 20},
                   files=[("file", ("photo.png", png_bytes(999)))])
        assert r.status_code == 200, r.text
        names = {n["filename"] for n in r.json()["results"][0]["neighbors"]}
        # (coat/2.png was uploaded again above as x.png: the latest name given is kept)
        assert names == (set(files) - {"coat/2.png"}) | {"x.png"}


def test_listing_and_shards(tmp_path: Path) -> None:
    make_tree(tmp_path)
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == sorted(found) and "notes.txt" not in found and len(found) == 9
    for rel in found:
        assert sum(in_shard(rel, (i, 3)) for i in range(3)) == 1


def test_bad_shard_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["index", str(tmp_path), "--shard", "3/3"])
    assert e.value.code == 2


def test_an_int8_index_is_read_by_int8_servers_and_by_no_float32_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: the indexer built its predictor without the precision, so with
    IMGREC_PRECISION=int8 it stored float32 vectors, under the one key (the weights sha256) an
    int8 server also read, with vectors of its own graph."""
    tree = tmp_path / "catalogue"
    files = make_tree(tree)
    store = str(tmp_path / "emb.sqlite3")
    for name, value in {"IMGREC_EMBED_STORE": store, "IMGREC_DEVICE": "cpu",
                        "IMGREC_MODEL_DIR": str(DEFAULT_MODEL_DIR),
                        "IMGREC_PRECISION": "int8"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("IMGREC_ENGINE", raising=False)  # auto: ONNX Runtime, as int8 needs
    assert main(["index", str(tree), "--no-progress"]) == 0
    assert "indexed 8 images" in capsys.readouterr().err
    ids = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}

    base = {"model_dir": DEFAULT_MODEL_DIR, "device": "cpu", "engine": "auto",
            "warmup_batches": 1, "embed_store": store}
    int8 = Settings(**base, precision="int8")
    with TestClient(create_app(int8)) as c:
        r = c.get("/embed", params={"id": list(ids.values())})
        assert r.status_code == 200, r.text
        indexed = {x["id"]: x["embedding"] for x in r.json()["results"]}
        # the vectors the int8 server computes itself for the same bytes
        r = c.post("/embed", files=[("file", (rel, data)) for rel, data in files.items()])
        for rel, result in zip(files, r.json()["results"], strict=True):
            np.testing.assert_allclose(indexed[ids[rel]], result["embedding"], rtol=1e-5,
                                       atol=1e-5, err_msg=rel)
    with TestClient(create_app(Settings(**base, precision="float32"))) as c:
        r = c.get("/embed", params={"id": list(ids.values())})
        assert r.status_code == 404  # float32 vectors are stored apart: none were indexed


def test_float32_keeps_its_key_and_int8_has_its_own() -> None:
    card = read_card(DEFAULT_MODEL_DIR)
    base = {"model_dir": DEFAULT_MODEL_DIR, "device": "cpu", "engine": "auto"}
    keys = {p: Predictor.from_settings(Settings(**base, precision=p)).model_key
            for p in ("float32", "int8")}
    assert keys == {p: model_key(card, p) for p in keys}
    # float32's is the weights sha256 as before, so existing stores stay readable
    assert keys["float32"] == card.weights_sha256 != keys["int8"]
    assert keys["int8"] == f"{card.weights_sha256}:int8:{card.graphs['int8'].sha256[:16]}"
    assert store_key(model_key(card, "float32"), None) == card.weights_sha256
    assert store_key(model_key(card, "float32"), "ns") == f"{card.weights_sha256}:ns"
    # another quantisation of the same weights is another int8 graph, and another key
    other = card.model_copy(update={"graphs": {**card.graphs, "int8": card.graphs["int8"]
                                               .model_copy(update={"sha256": "0" * 64})}})
    assert model_key(other, "int8") != model_key(card, "int8")
    without = card.model_copy(update={"graphs": {"float32": card.graphs["float32"]}})
    with pytest.raises(ValueError, match="no int8 graph"):
        model_key(without, "int8")


def test_the_same_bytes_twice_in_one_batch_are_indexed_once(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: two files with the same bytes in one batch were sent to the store as one
    id twice, which crashed the run (IndexError in the similarity index)."""
    tree = tmp_path / "catalogue"
    tree.mkdir()
    for name, seed in (("a.png", 1), ("copy-of-a.png", 1), ("b.png", 2)):
        (tree / name).write_bytes(png_bytes(seed))
    monkeypatch.setenv("IMGREC_EMBED_STORE", str(tmp_path / "emb.sqlite3"))
    monkeypatch.setenv("IMGREC_DEVICE", "cpu")
    monkeypatch.setenv("IMGREC_ENGINE", "torch")
    assert main(["index", str(tree), "--model-dir", str(tiny_model_dir), "--no-progress",
                 "--parquet", str(tmp_path / "v.parquet")]) == 0
    assert "indexed 2 images, 1 already stored, 0 unreadable, of 3" in capsys.readouterr().err
    table = pq.read_table(tmp_path / "v.parquet").to_pydict()
    assert table["filename"] == ["a.png", "b.png", "copy-of-a.png"]  # a row per file
    assert table["id"][0] == table["id"][2] and table["vector"][0] == table["vector"][2]
