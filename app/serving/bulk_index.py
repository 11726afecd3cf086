"""`imgrec index DIR`: embed a folder of images (or an ImageFolder tree) into the store.

The same bytes -> id (sha256), the same decoding and checks (images.prepare), the same model
(Predictor) and the same store and store key as the service, so that a served /search finds
what was indexed here. Batched on the model's device; images already stored are skipped, so an
interrupted run resumes where it stopped; ``--shard i/n`` takes every n-th file by a hash of
its path, so n machines can split one catalogue with no coordination.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app.serving.store.vector_index import clean_filename
from app.serving.upload_checks import ImageError, prepare

log = logging.getLogger("imgrec.index")

EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif"}


def list_images(root: Path) -> list[Path]:
    """Image files under root (any depth), sorted by path so that runs agree."""
    found = [Path(d) / f for d, _, files in os.walk(root) for f in files
             if Path(f).suffix.lower() in EXTENSIONS]
    return sorted(found)


def in_shard(relpath: str, shard: tuple[int, int]) -> bool:
    index, count = shard
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count == index


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def index_main(argv: list[str]) -> int:
    from app.settings import Settings

    settings = Settings()
    ap = argparse.ArgumentParser(prog="imgrec index", description=(
        "Embed every image under DIR into the embedding store (IMGREC_EMBED_STORE) with the "
        "served model's preprocessing and ids; images already stored are skipped."))
    ap.add_argument("dir", type=Path, help="a folder of images, or an ImageFolder tree")
    ap.add_argument("--model-dir", type=Path, default=settings.model_dir)
    ap.add_argument("--store", default=settings.embed_store,
                    help="embedding store (default IMGREC_EMBED_STORE)")
    ap.add_argument("--batch-size", type=int, default=settings.max_batch_size)
    ap.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                    help="index only shard I of N (files split by a hash of their path)")
    ap.add_argument("--namespace", default=None,
                    help="store under this API key namespace (as that key's requests do)")
    ap.add_argument("--parquet", type=Path, default=None, metavar="OUT",
                    help="also write (id, filename, vector) rows to this Parquet file "
                         "(needs pyarrow: pip install 'imgrec[parquet]')")
    ap.add_argument("--device", default=settings.device)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if not args.dir.is_dir():
        ap.error(f"{args.dir}: not a directory")
    if args.parquet is not None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            ap.error("--parquet needs pyarrow: pip install 'imgrec[parquet]'")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run_index(args.dir, args.model_dir, args.store, settings.embed_store_max_items,
                        args.batch_size, args.shard, args.namespace, args.parquet, args.device,
                        settings, progress=not args.no_progress)
    print(summary, file=sys.stderr)
    return 0


def run_index(root: Path, model_dir: Path, store_url: str, max_items: int, batch_size: int,
              shard: tuple[int, int], namespace: str | None, parquet: Path | None,
              device: str, settings: object, progress: bool = True) -> str:
    from tqdm import tqdm

    from app.serving.predictor import Predictor
    from app.serving.store import open_store
    from app.settings import Settings

    assert isinstance(settings, Settings)
    files = [p for p in list_images(root) if in_shard(p.relative_to(root).as_posix(), shard)]
    predictor = Predictor(model_dir, device, settings.dtype, settings.torch_threads,
                          settings.engine)
    key = predictor.model_key if namespace is None else f"{predictor.model_key}:{namespace}"
    store = open_store(store_url, max_items)
    spec, max_pixels = predictor.card.input, settings.max_image_pixels
    rows: tuple[list[str], list[str], list[np.ndarray]] = ([], [], [])
    done = skipped = bad = 0
    started = time.perf_counter()

    def load(job: tuple[Path, str, bytes]) -> tuple[Path, str, bytes | ImageError]:
        path, image_id, data = job
        try:
            return path, image_id, prepare(data, spec, max_pixels)
        except ImageError as e:
            return path, image_id, e

    try:
        with ThreadPoolExecutor(max_workers=settings.decode_threads) as pool, \
                tqdm(total=len(files), unit="img", disable=not progress) as bar:
            for chunk in _chunks(files, batch_size):
                names = [clean_filename(p.relative_to(root).as_posix()) for p in chunk]
                blobs = [p.read_bytes() for p in chunk]
                ids = [hashlib.sha256(b).hexdigest() for b in blobs]
                stored = store.get_many(key, ids)
                todo = [(p, i, b) for p, i, b in zip(chunk, ids, blobs, strict=True)
                        if i not in stored]
                prepared = []
                for path, image_id, out in pool.map(load, todo):
                    if isinstance(out, ImageError):
                        bad += 1
                        log.warning("%s: skipped: %s", path, out.message)
                    else:
                        prepared.append((path, image_id, out))
                if prepared:
                    predictions = predictor.forward([px for _, _, px in prepared])
                    named = dict(zip(chunk, names, strict=True))
                    store.put_many(key, [(i, p.embedding) for (_, i, _), p in
                                         zip(prepared, predictions, strict=True)],
                                   [named[path] for path, _, _ in prepared])
                    for (_, image_id, _), p in zip(prepared, predictions, strict=True):
                        stored[image_id] = p.embedding
                done += len(prepared)
                skipped += len(chunk) - len(todo)
                if parquet is not None:
                    for image_id, name in zip(ids, names, strict=True):
                        if image_id in stored:
                            rows[0].append(image_id)
                            rows[1].append(name or "")
                            rows[2].append(stored[image_id])
                bar.update(len(chunk))
    finally:
        store.close()
    if parquet is not None:
        write_parquet(parquet, *rows)
    seconds = time.perf_counter() - started
    return (f"indexed {done} images, {skipped} already stored, {bad} unreadable, of "
            f"{len(files)} in shard {shard[0]}/{shard[1]} in {seconds:.1f} s "
            f"({done / seconds if seconds else 0:.1f} images/s) into {key[:12]}…")


def write_parquet(path: Path, ids: list[str], names: list[str],
                  vectors: list[np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = len(vectors[0]) if vectors else 0
    flat = np.concatenate(vectors).astype(np.float32) if vectors else np.zeros(0, np.float32)
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "filename": pa.array([n or None for n in names], pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
