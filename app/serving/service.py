"""The serving core the routes talk to: decode pool -> micro-batcher -> predictor -> store.

Lifecycle: ``start()`` opens the store, loads the model onto its device, runs the warm-up and
only then reports ready; ``begin_drain()`` turns readiness off while requests are still served
(the lame duck of a SIGTERM); ``stop()`` refuses new work, answers everything already accepted,
then ends the worker and closes the store.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from app.model.card import InputSpec
from app.serving.batcher import Closed, DeadlineExceeded, MicroBatcher, QueueFull
from app.serving.metrics import Metrics
from app.serving.predictor import Prediction, Predictor
from app.serving.store import open_store
from app.serving.store.guard import GuardedStore, StoreUnavailable
from app.serving.store.vector_index import Neighbor, SearchUnavailable, clean_filename
from app.serving.upload_checks import ImageError, prepare
from app.settings import Settings

log = logging.getLogger("imgrec.service")


class ServiceError(Exception):
    """A refusal with its HTTP status; the API layer turns it into a JSON error."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


@dataclass(slots=True)
class ImageResult:
    id: str
    prediction: Prediction
    stored: bool = False  # its vector reached the embedding store (False during an outage)


# what the batcher carries per image: (image id, pixels, store key, filename)
Job = tuple[str, bytes, str, str | None]


def _prepare_job(data: bytes, spec: InputSpec, max_pixels: int,
                 max_header_pixels: int) -> tuple[str, bytes, float]:
    t0 = time.perf_counter()
    image_id = hashlib.sha256(data).hexdigest()
    pixels = prepare(data, spec, max_pixels, max_header_pixels)
    return image_id, pixels, time.perf_counter() - t0


class Service:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.predictor: Predictor | None = None
        self.batcher: MicroBatcher[Job, ImageResult] | None = None
        self.store: GuardedStore | None = None
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.decode_threads,
                                               thread_name_prefix="decode")
        self.ready = False
        self.draining = False
        self.serving = False  # from ready until stop(); draining does not end it
        self.started_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.store = GuardedStore(
            partial(open_store, s.embed_store, s.embed_store_max_items, s.embed_store_timeout_s),
            self.metrics, backoff_min_s=s.embed_store_backoff_min_s,
            backoff_max_s=s.embed_store_backoff_max_s)
        await asyncio.to_thread(self.store.start)
        self.predictor = await asyncio.to_thread(
            Predictor, s.model_dir, s.device, s.dtype, s.torch_threads, s.engine, s.precision)
        self.batcher = MicroBatcher(
            self._forward, max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms, max_queue=s.max_queue,
            on_batch=self.metrics.observe_batch, finish=self._keep)
        await self.batcher.on_inference_thread(self.predictor.warm_up, s.warmup_batches,
                                               s.max_batch_size)
        self.batcher.start()
        # Start-up leaves millions of long-lived objects (torch, the ONNX export); without this
        # every full collection walks them all and stalls the event loop for 100+ ms (seen as
        # p99 = 10x p50). Freezing moves them out of the collector's view.
        gc.collect()
        gc.freeze()
        self.ready = self.serving = True
        self.metrics.ready.set(1)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth if self.batcher else 0)
        log.info("ready: %s on %s", self.predictor.card.name, self.predictor.device)

    def begin_drain(self) -> None:
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)

    async def stop(self) -> None:
        self.begin_drain()
        self.serving = False
        if self.batcher is not None:
            await self.batcher.stop()
        self._decode_pool.shutdown(wait=True)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        log.info("stopped: every accepted image answered")

    # -- work ----------------------------------------------------------------------------------
    def store_key(self, namespace: str | None) -> str:
        """The embedding store's key for this model and caller: vectors of another model, or
        of another API key's namespace, are never found under it."""
        assert self.predictor is not None
        key = self.predictor.model_key
        return key if namespace is None else f"{key}:{namespace}"

    def _forward(self, items: list[Job]) -> list[ImageResult]:
        """On the inference thread."""
        assert self.predictor is not None
        predictions = self.predictor.forward([item[1] for item in items])
        return [ImageResult(item[0], p) for item, p in zip(items, predictions, strict=True)]

    def _keep(self, items: list[Job], results: Sequence[ImageResult]) -> None:
        """On the batcher's finish thread, while the next batch computes: every vector goes to
        the store before its request is answered, so a GET /embed right after finds it. A
        store outage only marks the results as not stored (the guard never raises)."""
        assert self.store is not None
        by_key: dict[str, list[tuple[ImageResult, str | None]]] = {}
        for (_, _, key, name), r in zip(items, results, strict=True):
            by_key.setdefault(key, []).append((r, name))
        for key, named in by_key.items():
            group = [r for r, _ in named]
            started = time.perf_counter()
            stored = self.store.put_many(key, [(r.id, r.prediction.embedding) for r in group],
                                         [name for _, name in named])
            if stored:
                self.metrics.store_write_seconds.observe(time.perf_counter() - started)
            for r in group:
                r.stored = stored

    def _refusal(self, reason: str, code: str, message: str) -> ServiceError:
        self.metrics.rejections.labels(reason).inc()
        return ServiceError(503, code, message, retry_after=self.settings.retry_after_s)

    async def infer(self, uploads: list[bytes], namespace: str | None = None,
                    filenames: Sequence[str | None] | None = None) -> list[ImageResult]:
        """Decode in parallel off the loop, queue all images at once, await their results.
        Their vectors are stored under ``store_key(namespace)``, with the (cleaned) filenames."""
        self._check_serving()
        assert self.predictor is not None
        loop = asyncio.get_running_loop()
        spec, max_pixels = self.predictor.card.input, self.settings.max_image_pixels
        header_pixels = self.settings.max_image_header_pixels
        jobs = [loop.run_in_executor(self._decode_pool, _prepare_job, data, spec, max_pixels,
                                     header_pixels) for data in uploads]
        done = await asyncio.gather(*jobs, return_exceptions=True)
        for index, outcome in enumerate(done):
            if isinstance(outcome, ImageError):
                self.metrics.rejections.labels(outcome.code).inc()
                where = f"file {index + 1} of {len(uploads)}: " if len(uploads) > 1 else ""
                raise ServiceError(outcome.status, outcome.code, where + outcome.message)
            if isinstance(outcome, BaseException):
                raise outcome
        prepared = [o for o in done if not isinstance(o, BaseException)]
        for _, _, seconds in prepared:
            self.metrics.decode_seconds.observe(seconds)
        names = [clean_filename(n) for n in filenames] if filenames else [None] * len(prepared)
        return await self._run([(image_id, pixels, name) for (image_id, pixels, _), name
                                in zip(prepared, names, strict=True)], namespace)

    async def infer_pixels(self, pixels: np.ndarray, namespace: str | None = None
                           ) -> list[ImageResult]:
        """Images the caller decoded: uint8 (N, C, H, W) at the card's input size. They join the
        same batches as uploads; an image's id is the sha256 of its (C, H, W) pixel bytes."""
        self._check_serving()
        assert self.predictor is not None
        if pixels.dtype != np.uint8 or pixels.shape[1:] != self.predictor.image_shape:
            raise ServiceError(400, "bad_pixels", f"pixels must be uint8 (N, "
                               f"{', '.join(map(str, self.predictor.image_shape))}), got "
                               f"{pixels.dtype} {tuple(pixels.shape)}")
        images = [image.tobytes() for image in np.ascontiguousarray(pixels)]
        return await self._run([(hashlib.sha256(b).hexdigest(), b, None) for b in images],
                               namespace)

    def _check_serving(self) -> None:
        if not self.serving or self.batcher is None or self.predictor is None:
            raise self._refusal("not_ready", "not_ready", "the service is not ready "
                                "(warming up or shutting down)")

    async def _run(self, items: list[tuple[str, bytes, str | None]], namespace: str | None
                   ) -> list[ImageResult]:
        """Queue prepared (image id, pixel bytes, filename) items at once and await their
        results; the one queueing path of uploads and decoded pixels alike."""
        assert self.batcher is not None
        key = self.store_key(namespace)
        try:
            futures = self.batcher.submit_many(
                [(image_id, pixels, key, name) for image_id, pixels, name in items],
                self.settings.request_timeout_ms / 1000.0)
        except QueueFull as e:
            raise self._refusal("queue_full", "overloaded", f"{e}; retry later") from None
        except Closed as e:
            raise self._refusal("shutting_down", "shutting_down", str(e)) from None
        try:
            results = await asyncio.gather(*futures)
        except DeadlineExceeded as e:
            for f in futures:  # the rest of this request is no longer wanted
                f.cancel()
            self.metrics.rejections.labels("deadline").inc()
            raise ServiceError(504, "deadline_exceeded", str(e)) from None
        except Exception as e:  # the batch failed: this request fails, the service goes on
            for f in futures:
                f.cancel()
            log.exception("inference failed")
            raise ServiceError(500, "inference_failed", f"inference failed: {e}") from None
        return list(results)

    async def lookup(self, ids: list[str], namespace: str | None = None
                     ) -> dict[str, np.ndarray]:
        """The vectors stored under ``store_key(namespace)`` for these ids (unknown ones are
        absent); 503 while the store is down."""
        if self.store is None or self.predictor is None:
            raise self._refusal("not_ready", "not_ready", "the service is not ready")
        try:
            return await asyncio.to_thread(self.store.get_many, self.store_key(namespace), ids)
        except StoreUnavailable:
            raise self._refusal("store_unavailable", "store_unavailable",
                                "the embedding store is unavailable; retry later") from None

    async def search(self, query: np.ndarray, k: int, exclude: str | None = None,
                     namespace: str | None = None) -> list[Neighbor]:
        """The k stored images nearest to query (cosine), best first, never ``exclude``."""
        if self.store is None or self.predictor is None:
            raise self._refusal("not_ready", "not_ready", "the service is not ready")
        try:
            return await asyncio.to_thread(self.store.search, self.store_key(namespace), query,
                                           k, exclude)
        except SearchUnavailable as e:
            raise ServiceError(501, "search_unavailable", str(e)) from None
        except StoreUnavailable:
            raise self._refusal("store_unavailable", "store_unavailable",
                                "the embedding store is unavailable; retry later") from None

    async def search_stored(self, image_id: str, k: int, namespace: str | None = None
                            ) -> tuple[str | None, list[Neighbor]] | None:
        """(filename, neighbours) of a stored image, or None when it is not stored: one hop
        to a worker thread for the lookup and the search together."""
        if self.store is None or self.predictor is None:
            raise self._refusal("not_ready", "not_ready", "the service is not ready")
        store, key = self.store, self.store_key(namespace)

        def run() -> tuple[str | None, list[Neighbor]] | None:
            found = store.get_many(key, [image_id])
            if image_id not in found:
                return None
            return (store.filenames(key, [image_id]).get(image_id),
                    store.search(key, found[image_id], k, image_id))

        try:
            return await asyncio.to_thread(run)
        except SearchUnavailable as e:
            raise ServiceError(501, "search_unavailable", str(e)) from None
        except StoreUnavailable:
            raise self._refusal("store_unavailable", "store_unavailable",
                                "the embedding store is unavailable; retry later") from None
