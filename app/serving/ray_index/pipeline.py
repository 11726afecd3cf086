"""The Ray Data pipeline of ``imgrec index SOURCE --ray [ADDRESS]``, and the driver that writes
its output.

    listing (driver) -> read_files + decode (tasks: bytes, sha256, store asked, prepare)
                     -> Embedder (an actor pool: one model load per actor, batched)
                     -> driver: StoreWriter.put (one writer actor), Parquet, report, tally

Ray runs the tasks and actors where the cluster has room, retries what a dead worker was
doing, and shows its progress bars; the driver consumes the output batch by batch, so a store
write is never far behind the embedding, and a killed run loses only the batches in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.serving.ray_index import stages
from app.serving.ray_index.report import Classifier, FailureReport, ParquetRows, Tally
from app.serving.ray_index.source import Listing, list_source

if TYPE_CHECKING:
    import pyarrow as pa

    from app.model.card import ModelCard
    from app.settings import Settings

log = logging.getLogger("imgrec.index")

FILES_PER_TASK = 64  # files one read+decode task takes: its block of the listing
# rows per batch of the embedding actors (forward passes of IMGREC_MAX_BATCH_SIZE inside):
# each batch costs the driver a share of Ray Data's bookkeeping and one store write; batches
# of 256 rows cost it 0.24 ms of CPU per image against 0.34 for 32 (BENCHMARKS.md, section 8)
ROWS_PER_BATCH = 256
WRITER_THREADS = 8  # store lookups the writer actor answers at once, beside its write


@dataclass
class RayOptions:
    """Where to run: ``address`` None starts a Ray of this process's own on this machine
    (``num_cpus``/``num_gpus``/``object_store_bytes`` size it, Ray's defaults otherwise: the
    whole machine); ``auto``, ``ray://host:10001`` or ``host:6379`` join a running cluster."""

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_bytes: int | None = None
    progress: bool = True
    decode_tasks: bool = False  # decode in tasks of their own even on CPUs (Plan)


@dataclass(frozen=True)
class Plan:
    """The embedding actors, sized to the cluster: one per GPU when the cluster has GPUs and the
    settings allow one, else one per ``threads`` CPUs. All are asked for at once (Ray starts
    them as room appears; the pipeline runs as soon as one is up). ``decode_tasks``: read and
    decode in a task pool of their own (on the CPUs beside the GPUs); without it Ray fuses them
    into the CPU actors, so that the core that decodes a batch also embeds it and the pixels
    never cross the object store."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    decode_tasks: bool

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_actor > 0


def plan(resources: dict[str, float], settings: Settings, decode_tasks: bool = False) -> Plan:
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    wants_gpu = settings.device.startswith("cuda")
    may_gpu = settings.device == "auto" and settings.precision == "float32"
    if wants_gpu and gpus == 0:
        raise ValueError(f"device {settings.device}: the Ray cluster has no GPU")
    if gpus and (wants_gpu or may_gpu):
        return Plan(gpus, 1.0, 1.0, True)
    threads = max(settings.torch_threads, 1)
    actors = max(1, (cpus - 1 if decode_tasks and cpus > 1 else cpus) // threads)
    return Plan(actors, float(threads), 0.0, decode_tasks)


def connect(options: RayOptions) -> bool:
    """Join or start Ray; True when this call started it (and so shuts it down)."""
    import ray

    if ray.is_initialized():  # a caller's own Ray (tests, notebooks): use it as it is
        return False
    if options.address in (None, "local"):
        context = ray.init(address="local", num_cpus=options.num_cpus,
                           num_gpus=options.num_gpus,
                           object_store_memory=options.object_store_bytes,
                           logging_level=logging.WARNING)
    else:
        # the cluster's workers run this driver's own imgrec code (its dependencies must be
        # installed there: pip install 'imgrec[ray]')
        import app

        context = ray.init(address=options.address, logging_level=logging.WARNING,
                           runtime_env={"py_modules": [str(Path(app.__file__).parent)],
                                        "excludes": ["__pycache__"]})
    url = getattr(context, "dashboard_url", None)
    if url:
        log.info("Ray dashboard: http://%s", url)
    return True


def run_ray_index(source: str, settings: Settings, options: RayOptions,
                  namespace: str | None = None, parquet: Path | None = None,
                  report: Path | None = None) -> Tally:
    """Index every file SOURCE names into the settings' store, under the key a server with
    these settings reads (as run_index does on one machine); returns the tally."""
    from app.model.directory import open_model_dir
    from app.serving.store_key import model_key, store_key

    model_dir, card = open_model_dir(settings.model_dir)
    key = store_key(model_key(card, settings.precision), namespace)
    listing = list_source(source)
    if len(listing) > settings.embed_store_max_items:
        log.warning("%d files but the store keeps %d vectors (IMGREC_EMBED_STORE_MAX_ITEMS): "
                    "the oldest are evicted, and a rerun embeds them again", len(listing),
                    settings.embed_store_max_items)
    log.info("%s: %d files (%s) into %s under %s…", source, len(listing), listing.what,
             settings.embed_store, key[:12])
    if not listing:
        return Tally(key)
    started_here = connect(options)
    try:
        return _run(listing, settings, options, model_dir, card, key, parquet, report)
    finally:
        if started_here:
            import ray

            ray.shutdown()


def _run(listing: Listing, settings: Settings, options: RayOptions, model_dir: Path,
         card: ModelCard, key: str, parquet: Path | None, report: Path | None) -> Tally:
    import ray

    started = time.perf_counter()
    writer = start_writer(settings)
    rows = (ParquetRows(parquet, card.embedding_dim, Classifier(model_dir, card))
            if parquet is not None else None)
    failures = FailureReport(report)
    tally = Tally(key)
    try:
        dataset = build(listing, settings, options, model_dir, card, key, writer,
                        with_vectors=rows is not None)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow",
                                          prefetch_batches=2):
            write(batch, key, writer, tally, failures, rows)
        tally.seconds = time.perf_counter() - started
        if rows is not None:
            rows.finish()
    finally:
        failures.close()
        if rows is not None:
            rows.abandon()
        ray.get(writer.close.remote())
        ray.kill(writer)
    return tally


def start_writer(settings: Settings) -> Any:
    """The StoreWriter actor, on the driver's node (a SQLite store is a file on this machine),
    taking no CPU from the pipeline."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor: Any = ray.remote(stages.StoreWriter)
    return actor.options(
        num_cpus=0, max_concurrency=WRITER_THREADS,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(_store_url(settings.embed_store), settings.embed_store_max_items)


def _store_url(url: str) -> str:
    """A SQLite path made absolute: the writer actor's working folder is not the driver's."""
    if url == "memory" or url.startswith(("redis://", "rediss://", "unix://")):
        return url
    return str(Path(url.removeprefix("sqlite://")).resolve())


def build(listing: Listing, settings: Settings, options: RayOptions, model_dir: Path,
          card: ModelCard, key: str, writer: Any, with_vectors: bool) -> Any:
    """The dataset: the listing in blocks of FILES_PER_TASK files, read and decoded (one task
    per block), embedded by the actor pool in batches of ROWS_PER_BATCH rows."""
    import ray
    import ray.data

    from app.serving.store_key import model_key

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = options.progress
    context.enable_operator_progress_bars = options.progress
    p = plan(ray.cluster_resources(), settings, options.decode_tasks)
    batches = -(-len(listing) // ROWS_PER_BATCH)  # no more actors than batches to give them
    p = dataclasses.replace(p, actors=max(1, min(p.actors, batches)))
    log.info("embedding actors: %d, %g CPU and %g GPU each; decode in %s", p.actors,
             p.cpus_per_actor, p.gpus_per_actor,
             "tasks of their own" if p.decode_tasks else "the actors (fused by Ray)")
    # a task pool with a remote-args function is never fused into the actors (Ray Data's
    # optimizer cannot know its arguments ahead)
    tasks: dict[str, Any] = ({"ray_remote_args_fn": _decode_task_args} if p.decode_tasks
                             else {"num_cpus": p.cpus_per_actor})
    data: Any = ray.data.from_arrow(_blocks(listing))
    data = data.map_batches(
        stages.read_and_decode, batch_size=None, batch_format="pyarrow", **tasks,
        fn_kwargs={"fs": listing.fs, "max_bytes": settings.max_upload_bytes, "key": key,
                   "lookup": stages.StoreLookup(writer), "with_vectors": with_vectors,
                   "spec": card.input, "max_pixels": settings.max_image_pixels,
                   "max_header_pixels": settings.max_image_header_pixels})
    return data.map_batches(
        stages.Embedder, batch_size=max(ROWS_PER_BATCH, settings.max_batch_size),
        batch_format="pyarrow",
        # CPU actors run on the CPU even on a GPU node (the int8 graph, device=cpu, no GPU left)
        fn_constructor_kwargs={"settings": settings if p.on_gpu
                               else settings.model_copy(update={"device": "cpu"}),
                               "model_key": model_key(card, settings.precision),
                               "shipped": [ray.put(stages.model_files(model_dir))]},
        compute=ray.data.ActorPoolStrategy(size=p.actors),
        num_cpus=p.cpus_per_actor, num_gpus=p.gpus_per_actor)


def _decode_task_args() -> dict[str, Any]:
    return {"num_cpus": 1}


def _blocks(listing: Listing) -> list[pa.Table]:
    import pyarrow as pa

    step = FILES_PER_TASK
    return [pa.table({"path": pa.array(listing.paths[i:i + step], pa.string()),
                      "filename": pa.array(listing.filenames[i:i + step], pa.string()),
                      "size": pa.array(listing.sizes[i:i + step], pa.int64())})
            for i in range(0, len(listing), step)] or [_empty()]


def _empty() -> pa.Table:
    import pyarrow as pa

    return pa.table({"path": pa.array([], pa.string()), "filename": pa.array([], pa.string()),
                     "size": pa.array([], pa.int64())})


def write(batch: pa.Table, key: str, writer: Any, tally: Tally, failures: FailureReport,
          rows: ParquetRows | None) -> None:
    """One output batch: its new vectors to the store (the writer says which it stored), its
    failures to the report, every stored file's row to the Parquet file, all to the tally."""
    import ray

    status = batch.column("status").to_pylist()
    ids = batch.column("id").to_pylist()
    names = batch.column("filename").to_pylist()
    vectors = batch.column("vector").to_pylist()
    new = [i for i, s in enumerate(status) if s == stages.NEW]
    fresh = set(ray.get(writer.put.remote(key, [ids[i] for i in new], [vectors[i] for i in new],
                                          [names[i] for i in new]))) if new else set()
    tally.files += len(status)
    tally.stored += len(fresh)
    tally.skipped += len(new) - len(fresh) + status.count(stages.SKIPPED)
    if stages.FAILED in status:
        paths, reasons = batch.column("path").to_pylist(), batch.column("reason").to_pylist()
        for i, s in enumerate(status):
            if s == stages.FAILED:
                failures.add(paths[i], names[i], reasons[i])
        tally.failed += status.count(stages.FAILED)
    if rows is not None:
        keep = [i for i, s in enumerate(status) if s != stages.FAILED]
        labels, scores = batch.column("label").to_pylist(), batch.column("score").to_pylist()
        rows.add([ids[i] for i in keep], [names[i] for i in keep], [labels[i] for i in keep],
                 [scores[i] for i in keep], [vectors[i] for i in keep])
