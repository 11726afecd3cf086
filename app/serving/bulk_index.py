"""`imgrec index DIR`: embed a folder of images (or an ImageFolder tree) into the store.

The same bytes -> id (sha256), the same decoding and checks (upload_checks.prepare), the same
model (``Predictor.from_settings``: device, engine and precision) and the same store and store
key (app/serving/store_key.py) as the service, so that a served /search or GET /embed finds
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
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.model.directory import ModelDirError
from app.serving.request_rules import clean_filename
from app.serving.store_key import store_key
from app.serving.upload_checks import ImageError, prepare

if TYPE_CHECKING:
    from app.serving.predictor import Predictor
    from app.serving.store import EmbeddingStore
    from app.settings import Settings

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
    ap = _parser(settings)
    args = ap.parse_args(argv)
    _check_args(ap, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the command line's choices, then IMGREC_* as the server reads them, for everything else
    settings = settings.model_copy(update={
        "model_dir": args.model_dir, "embed_store": args.store, "max_batch_size": args.batch_size,
        "device": args.device, "precision": args.precision})
    if args.ray is not None:
        from app.serving.ray_index.cli import ray_index_main

        return ray_index_main(args, settings)
    try:
        summary = run_index(Path(args.source), settings, shard=args.shard,
                            namespace=args.namespace, parquet=args.parquet,
                            progress=not args.no_progress)
    except ModelDirError as e:  # names the file and the remedy (imgrec export DIR...)
        print(f"imgrec index: {e}", file=sys.stderr)
        return 1
    print(summary, file=sys.stderr)
    return 0


def _parser(settings: Settings) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imgrec index", description=(
        "Embed every image SOURCE names into the embedding store (IMGREC_EMBED_STORE) with the "
        "served model's preprocessing and ids; images already stored are skipped. On this "
        "machine by default; with --ray as a Ray Data pipeline, on a local Ray or a cluster."))
    ap.add_argument("source", metavar="SOURCE",
                    help="a folder of images, or an ImageFolder tree; with --ray also a file "
                         "listing paths, one a line, or a URI pyarrow reads (s3://, gs://, ...)")
    ap.add_argument("--model-dir", type=Path, default=settings.model_dir)
    ap.add_argument("--store", default=settings.embed_store,
                    help="embedding store (default IMGREC_EMBED_STORE)")
    ap.add_argument("--batch-size", type=int, default=settings.max_batch_size)
    ap.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                    help="index only shard I of N (files split by a hash of their path); "
                         "not with --ray, which splits the work itself")
    ap.add_argument("--namespace", default=None,
                    help="store under this API key namespace (as that key's requests do)")
    ap.add_argument("--parquet", type=Path, default=None, metavar="OUT",
                    help="also write a row per stored file to this Parquet file: (id, "
                         "filename, vector), with --ray (id, filename, label, score, vector) "
                         "(needs pyarrow: pip install 'imgrec[parquet]')")
    ap.add_argument("--device", default=settings.device)
    ap.add_argument("--precision", choices=["float32", "int8"], default=settings.precision,
                    help="the graph whose vectors to store (default IMGREC_PRECISION): the "
                         "precision of the servers that will read them, since int8 and "
                         "float32 vectors are stored apart")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = ap.add_argument_group("Ray Data (pip install 'imgrec[ray]')")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run as a Ray Data pipeline: without ADDRESS on a Ray of its own on "
                          "this machine; 'auto' (RAY_ADDRESS, or the cluster `ray start` "
                          "started here), ray://HOST:10001 or HOST:6379 join a running cluster "
                          "(put SOURCE before --ray)")
    ray.add_argument("--num-cpus", type=int, default=None,
                     help="CPUs of the local Ray (default: all of this machine's)")
    ray.add_argument("--num-gpus", type=int, default=None,
                     help="GPUs of the local Ray (default: all of this machine's)")
    ray.add_argument("--report", type=Path, default=None, metavar="FILE",
                     help="write every unreadable file with its reason to FILE (JSON lines)")
    return ap


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if args.ray is None:
        _check_single_machine(ap, args)
    else:
        from app.serving.ray_index.cli import check_ray_args

        check_ray_args(ap, args)
    if args.parquet is not None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            ap.error("--parquet needs pyarrow: pip install 'imgrec[parquet]'")


def _check_single_machine(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    given = [f for f, v in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus),
                            ("--report", args.report)) if v is not None]
    if given:
        ap.error(f"{', '.join(given)}: only with --ray")
    if not Path(args.source).is_dir():
        ap.error(f"{args.source}: not a directory (a listing or a URI needs --ray)")
    if args.shard is None:
        args.shard = (0, 1)


def run_index(root: Path, settings: Settings, shard: tuple[int, int] = (0, 1),
              namespace: str | None = None, parquet: Path | None = None,
              progress: bool = True) -> str:
    """Embed the shard's images under ``root`` with the model, device and precision the
    settings give (as a server with these settings would), into their store under the key that
    server reads; returns a one-line summary."""
    from tqdm import tqdm

    from app.serving.predictor import Predictor
    from app.serving.store import open_store

    files = [p for p in list_images(root) if in_shard(p.relative_to(root).as_posix(), shard)]
    predictor = Predictor.from_settings(settings)
    # writes only: the servers on this store index what it writes (ann_indexer.py)
    store = open_store(settings.embed_store, settings.embed_store_max_items, ann=False)
    batches = Batches(root, predictor, store, store_key(predictor.model_key, namespace),
                      settings)
    rows = Rows()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=settings.decode_threads) as pool, \
                tqdm(total=len(files), unit="img", disable=not progress) as bar:
            for chunk in _chunks(files, settings.max_batch_size):
                ids, names, stored = batches.index(chunk, pool)
                if parquet is not None:
                    rows.add(ids, names, stored)
                bar.update(len(chunk))
    finally:
        store.close()
    if parquet is not None:
        write_parquet(parquet, rows.ids, rows.names, rows.vectors)
    seconds = time.perf_counter() - started
    t = batches.tally
    return (f"indexed {t.done} images, {t.skipped} already stored, {t.bad} unreadable, of "
            f"{len(files)} in shard {shard[0]}/{shard[1]} in {seconds:.1f} s "
            f"({t.done / seconds if seconds else 0:.1f} images/s) into {batches.key[:12]}…")


@dataclass
class Tally:
    done: int = 0  # embedded and stored now
    skipped: int = 0  # already stored (by an earlier run, or a file with the same bytes)
    bad: int = 0  # refused by the upload checks


class Batches:
    """Indexes one batch of files at a time: reads them, skips what the store already holds,
    decodes the rest on the pool as the service decodes uploads, runs them as one batch and
    stores their vectors."""

    def __init__(self, root: Path, predictor: Predictor, store: EmbeddingStore, key: str,
                 settings: Settings) -> None:
        self.root, self.predictor, self.store, self.key = root, predictor, store, key
        self.spec = predictor.card.input
        self.max_pixels = settings.max_image_pixels
        self.max_header_pixels = settings.max_image_header_pixels
        self.tally = Tally()

    def index(self, paths: list[Path], pool: Executor
              ) -> tuple[list[str], list[str | None], dict[str, np.ndarray]]:
        """(ids, filenames, the vectors now stored for those ids) of these files."""
        names = [clean_filename(p.relative_to(self.root).as_posix()) for p in paths]
        blobs = [p.read_bytes() for p in paths]
        ids = [hashlib.sha256(b).hexdigest() for b in blobs]
        stored = self.store.get_many(self.key, ids)
        # one job per new id: the same bytes under two names are one image (the last name kept,
        # as the service keeps the latest filename it was given)
        todo = {i: (p, b, n) for p, i, b, n in zip(paths, ids, blobs, names, strict=True)
                if i not in stored}
        prepared = []
        for path, job in pool.map(self._prepare, todo.items()):
            if isinstance(job, ImageError):
                self.tally.bad += 1
                log.warning("%s: skipped: %s", path, job.message)
            else:
                prepared.append(job)
        if prepared:
            predictions = self.predictor.forward([pixels for _, pixels, _ in prepared])
            self.store.put_many(self.key, [(i, p.embedding) for (i, _, _), p in
                                           zip(prepared, predictions, strict=True)],
                                [name for _, _, name in prepared])
            for (image_id, _, _), p in zip(prepared, predictions, strict=True):
                stored[image_id] = p.embedding
        self.tally.done += len(prepared)
        self.tally.skipped += len(paths) - len(todo)
        return ids, names, stored

    def _prepare(self, job: tuple[str, tuple[Path, bytes, str | None]]
                 ) -> tuple[Path, tuple[str, bytes, str | None] | ImageError]:
        """On a pool thread: (path, (id, pixels, filename)), or the upload checks' refusal."""
        image_id, (path, data, name) = job
        try:
            return path, (image_id, prepare(data, self.spec, self.max_pixels,
                                            self.max_header_pixels), name)
        except ImageError as e:
            return path, e


@dataclass
class Rows:
    """The Parquet file's rows: one per file whose vector is stored, in listing order."""

    ids: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)

    def add(self, ids: list[str], names: list[str | None], stored: dict[str, np.ndarray]
            ) -> None:
        for image_id, name in zip(ids, names, strict=True):
            if image_id in stored:
                self.ids.append(image_id)
                self.names.append(name or "")
                self.vectors.append(stored[image_id])


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
