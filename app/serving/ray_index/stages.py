"""The pipeline's stages, each a function or class over one batch (a pyarrow table).

Every row is one file of the catalogue and stays one row to the end, so the driver accounts
for every file: ``status`` says what became of it, ``new`` (to embed), ``skipped`` (already
stored, never decoded) or ``failed`` (``reason`` says why). Columns, as they are added:

    path, filename, size            the listing (source.py)
    id, status, reason, data        read_files: the bytes and their sha256, the store asked
    vector                          read_files: the stored vector of a skipped file (for the
                                    Parquet output only), else empty; embed: the new ones'
    pixels                          decode (replaces data): upload_checks.prepare's output
    label, score                    Embedder (replaces pixels): the top class and its probability

Vectors and pixels travel as bytes (float32 little-endian, uint8 (C, H, W)): a binary column
holds nothing for the rows that have none.

The functions import no Ray; the pipeline (pipeline.py) hands them to Ray Data, and tests call
them directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.model.card import InputSpec
from app.serving.upload_checks import ImageError, prepare

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from app.settings import Settings

log = logging.getLogger("imgrec.index")

NEW, SKIPPED, FAILED = "new", "skipped", "failed"
READ_THREADS = 16  # reads in flight per task on an object store

# (store key, ids, with vectors) -> {id: stored vector bytes, or b"" without vectors}
Lookup = Callable[[str, list[str], bool], dict[str, bytes]]


def read_files(batch: pa.Table, fs: pafs.FileSystem, max_bytes: int, key: str,
               lookup: Lookup, with_vectors: bool) -> pa.Table:
    """Read each file's bytes, name it by their sha256 (the service's id), and ask the store
    which ids it holds: those are skipped here, before any decoding. A file that cannot be read,
    or is larger than an upload may be (IMGREC_MAX_UPLOAD_BYTES), fails with its reason.
    Object stores are read READ_THREADS files at a time (each read waits on the network)."""
    import pyarrow as pa

    n = batch.num_rows
    jobs = list(zip(batch.column("path").to_pylist(), batch.column("size").to_pylist(),
                    strict=True))

    def one(job: tuple[str, int | None]) -> bytes | str:
        return _read_one(fs, job[0], job[1], max_bytes)

    if fs.type_name == "local" or n < 2:
        blobs = [one(job) for job in jobs]
    else:
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, n)) as pool:
            blobs = list(pool.map(one, jobs))
    ids, status, reason = [""] * n, [FAILED] * n, [""] * n
    data: list[bytes] = [b""] * n
    for i, blob in enumerate(blobs):
        if isinstance(blob, str):
            reason[i] = blob
        else:
            ids[i], status[i], data[i] = hashlib.sha256(blob).hexdigest(), NEW, blob
    read = [i for i in range(n) if status[i] == NEW]
    stored = lookup(key, list(dict.fromkeys(ids[i] for i in read)), with_vectors) if read else {}
    vectors = [b""] * n
    for i in read:
        if ids[i] in stored:
            status[i], data[i], vectors[i] = SKIPPED, b"", stored[ids[i]]
    return (batch.append_column("id", pa.array(ids, pa.string()))
            .append_column("status", pa.array(status, pa.string()))
            .append_column("reason", pa.array(reason, pa.string()))
            .append_column("data", pa.array(data, pa.binary()))
            .append_column("vector", pa.array(vectors, pa.binary())))


def _read_one(fs: pafs.FileSystem, path: str, size: int | None, max_bytes: int) -> bytes | str:
    """The file's bytes, or why there are none."""
    if size is not None and size > max_bytes:
        return f"too_large: {size} bytes; an upload may have {max_bytes}"
    try:
        with fs.open_input_stream(path) as f:
            blob: bytes = f.read(max_bytes + 1)
    except OSError as e:
        return f"read_error: {e}"
    if len(blob) > max_bytes:
        return f"too_large: over {max_bytes} bytes, what an upload may have"
    return blob


def decode(batch: pa.Table, spec: InputSpec, max_pixels: int, max_header_pixels: int
           ) -> pa.Table:
    """The service's own decode and checks (upload_checks.prepare) on each new file; a refusal
    is the file's reason (``unsupported_image: ...``), never the run's end."""
    import pyarrow as pa

    status = batch.column("status").to_pylist()
    reason = batch.column("reason").to_pylist()
    data = batch.column("data")
    pixels: list[bytes] = [b""] * batch.num_rows
    for i, s in enumerate(status):
        if s != NEW:
            continue
        try:
            pixels[i] = prepare(data[i].as_py(), spec, max_pixels, max_header_pixels)
        except ImageError as e:
            status[i], reason[i] = FAILED, f"{e.code}: {e.message}"
        except Exception as e:  # a decoder's own failure on a hostile file: that file only
            log.exception("decoding %s failed", batch.column("path")[i].as_py())
            status[i], reason[i] = FAILED, f"decode_error: {type(e).__name__}: {e}"
    batch = _replace(batch, "status", pa.array(status, pa.string()))
    batch = _replace(batch, "reason", pa.array(reason, pa.string()))
    return batch.drop_columns(["data"]).append_column("pixels", pa.array(pixels, pa.binary()))


def read_and_decode(batch: pa.Table, fs: pafs.FileSystem, max_bytes: int, key: str,
                    lookup: Lookup, with_vectors: bool, spec: InputSpec, max_pixels: int,
                    max_header_pixels: int) -> pa.Table:
    """One task's work on a block of the listing: read_files, then decode."""
    return decode(read_files(batch, fs, max_bytes, key, lookup, with_vectors), spec,
                  max_pixels, max_header_pixels)


def _replace(batch: pa.Table, name: str, column: pa.Array) -> pa.Table:
    return batch.set_column(batch.schema.get_field_index(name), name, column)


def model_files(model_dir: Path) -> dict[str, bytes]:
    """The model directory's card, weights, inference graphs and calibration statistics, to
    ship to the actors through the object store: a cluster's nodes need not have the
    directory (every file the card vouches for by sha256, so the actors verify them too)."""
    from app.model.directory import WEIGHTS_FILE, read_card

    card = read_card(model_dir)
    names = ["card.json", WEIGHTS_FILE, *(g.file for g in card.graphs.values())]
    if card.calibration is not None:
        names.append(card.calibration.ood.file)
    return {n: (model_dir / n).read_bytes() for n in names if (model_dir / n).is_file()}


_materialise_lock = threading.Lock()


def materialise(files: dict[str, bytes]) -> Path:
    """The shipped model directory on this node: written once per node and content (named by
    a digest of every file, so a re-quantised graph of the same weights is another directory),
    renamed into place whole, shared by the node's actors."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\0".encode())
    root = Path(tempfile.gettempdir()) / "imgrec-models"
    final = root / digest.hexdigest()[:24]
    with _materialise_lock:
        if final.is_dir():
            return final
        root.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix=f"{final.name}.", dir=root))
        for name, blob in files.items():
            (part / name).write_bytes(blob)
        try:
            os.rename(part, final)
        except OSError:  # another process on this node won the race: use its copy
            for child in part.iterdir():
                child.unlink()
            part.rmdir()
    return final


class Embedder:
    """One per actor: loads the model once (Predictor.from_settings, as the service does: the
    same device, engine and precision) and embeds a batch's new files with one forward pass."""

    def __init__(self, settings: Settings, shipped: list[Any], model_key: str) -> None:
        self.batch_size = settings.max_batch_size
        import ray

        from app.model.directory import read_card
        from app.serving.predictor import Predictor

        card_dir = materialise(ray.get(shipped[0]))
        self.predictor = Predictor.from_settings(settings.model_copy(
            update={"model_dir": card_dir}))
        if self.predictor.model_key != model_key:  # the driver's key is the one stored under
            raise RuntimeError(f"the actor's model key {self.predictor.model_key} is not the "
                               f"driver's {model_key}")
        self.labels = read_card(card_dir).labels

    def __call__(self, batch: pa.Table) -> pa.Table:
        return embed(batch, self.predictor.forward, self.labels, self.batch_size)


def embed(batch: pa.Table, forward: Callable[[Sequence[bytes]], list[Any]],
          labels: Sequence[str], batch_size: int = 32) -> pa.Table:
    """The new rows' vectors, top label and its probability, in forward passes of
    ``batch_size`` images (IMGREC_MAX_BATCH_SIZE); other rows pass through."""
    import pyarrow as pa

    status = batch.column("status").to_pylist()
    new = [i for i, s in enumerate(status) if s == NEW]
    pixels = batch.column("pixels")
    vectors = batch.column("vector").to_pylist()
    label: list[str | None] = [None] * batch.num_rows
    score: list[float | None] = [None] * batch.num_rows
    for start in range(0, len(new), batch_size):
        chunk = new[start:start + batch_size]
        for i, p in zip(chunk, forward([pixels[i].as_py() for i in chunk]), strict=True):
            top = int(np.argmax(p.probs))
            vectors[i] = np.ascontiguousarray(p.embedding, "<f4").tobytes()
            label[i], score[i] = labels[top], float(p.probs[top])
    batch = _replace(batch.drop_columns(["pixels"]), "vector", pa.array(vectors, pa.binary()))
    return (batch.append_column("label", pa.array(label, pa.string()))
            .append_column("score", pa.array(score, pa.float32())))


class StoreWriter:
    """The one process that opens the embedding store: the read tasks ask it which ids are
    stored, the driver hands it every batch to write. One writer, as SQLite wants (and a Redis
    store gets its writes in order); threads serve the reads while a write runs."""

    def __init__(self, url: str, max_items: int) -> None:
        from app.serving.store import open_store

        self.store = open_store(url, max_items, ann=False)  # writes: servers index them
        self._write = threading.Lock()

    def known(self, key: str, ids: list[str], with_vectors: bool) -> dict[str, bytes]:
        found = self.store.get_many(key, ids)
        if not with_vectors:
            return dict.fromkeys(found, b"")
        return {i: np.ascontiguousarray(v, "<f4").tobytes() for i, v in found.items()}

    def put(self, key: str, ids: list[str], vectors: list[bytes], names: list[str | None]
            ) -> list[str]:
        """Store the vectors of the ids not yet stored (the first of each id given), and say
        which those were: an id already stored, by an earlier run or an earlier batch with the
        same bytes, is never written again, so every image is written exactly once."""
        with self._write:
            first: dict[str, int] = {}
            for n, image_id in enumerate(ids):
                first.setdefault(image_id, n)
            stored = self.store.get_many(key, list(first))
            fresh = [(i, n) for i, n in first.items() if i not in stored]
            if fresh:
                self.store.put_many(key, [(i, np.frombuffer(vectors[n], "<f4")) for i, n in fresh],
                                    [names[n] for _, n in fresh])
            return [i for i, _ in fresh]

    def count(self) -> int:
        return self.store.count()

    def close(self) -> None:
        self.store.close()


class StoreLookup:
    """read_files' ``lookup`` through the writer actor (a picklable handle)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def __call__(self, key: str, ids: list[str], with_vectors: bool) -> dict[str, bytes]:
        import ray

        return dict(ray.get(self.writer.known.remote(key, ids, with_vectors)))
