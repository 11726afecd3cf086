"""The one serving core every protocol talks to: decode pool -> micro-batcher -> predictor ->
store, and every rule a request meets on the way.

The skins (JSON routes, the Open Inference Protocol over REST and gRPC, search, the page) only
translate between their wire format and these calls, and map ``ServiceError`` to their error
body in one place. The rules live here: the lifecycle state, the accepting-work check (each
refusal counted once), the model being loaded, the image-count and top-k bounds, the caller's
store namespace, filename cleaning, the deadline, and whether the vectors were stored.

Lifecycle: ``start()`` opens the store, loads the model onto its device, runs the warm-up and
only then reports ``READY``; ``begin_drain()`` turns readiness off while requests are still
served (the lame duck of a SIGTERM: ``DRAINING``); ``stop()`` refuses new work, answers
everything already accepted, then ends the worker and closes the store (``STOPPED``).

The model can be replaced while READY (``reload_model``, app/serving/model_swap.py): each
request takes the served model once, when it starts, and every step of it (the decode to that
model's input, the forward pass, the store key, the answer's model) uses that one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from app.model.card import InputSpec, ModelCard
from app.serving import batcher, request_rules
from app.serving.batcher import Closed, MicroBatcher, QueueFull
from app.serving.errors import (
    BadRequest,
    DeadlineExceeded,
    InferenceFailed,
    SearchNotSupported,
    ServiceError,
    Unavailable,
    UnknownId,
)
from app.serving.metrics import Metrics
from app.serving.model_swap import IGNORED, ModelSwap
from app.serving.predictor import Prediction, Predictor
from app.serving.store import open_store
from app.serving.store.guard import GuardedStore, StoreUnavailable
from app.serving.store.vector_index import Neighbor, SearchUnavailable
from app.serving.store_key import store_key
from app.serving.tracing import OFF, BatchTrace, Tracing
from app.serving.upload_checks import NotSmall, prepare
from app.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanContext

log = logging.getLogger("imgrec.service")
T = TypeVar("T")


class Lifecycle(Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # readiness off, requests still served (the lame duck)
    STOPPED = "stopped"


@dataclass(slots=True)
class Upload:
    """One image file as a skin received it."""

    data: bytes
    filename: str | None = None


@dataclass(slots=True)
class ImageResult:
    id: str  # sha256 hex of the file's bytes (of the pixel bytes for decoded pixels)
    prediction: Prediction
    card: ModelCard  # of the model that computed it (the answer names it)
    store_key: str  # where its vector is stored: that model's key and the caller's namespace
    filename: str | None = None  # cleaned (request_rules.clean_filename)
    stored: bool = False  # its vector reached the embedding store (False during an outage)
    batch: BatchTrace | None = None  # the forward pass it ran in, when its request is traced


@dataclass(slots=True)
class Job:
    """What the batcher carries per image: the model its request took runs it."""

    image_id: str
    pixels: bytes  # uint8 (C, H, W) at that model's input size
    model: Predictor
    store_key: str
    filename: str | None
    traced: SpanContext | None = None  # its request's server span, when that is recorded


# At most this many images of one request are decoded on the event loop (each under
# ``decode_inline_pixels``, ~0.1 ms): a request of many small files does not hold the loop.
INLINE_PER_REQUEST = 4
Prepared = tuple[str, bytes, float, int]


def _prepare_job(data: bytes, spec: InputSpec, max_pixels: int, max_header_pixels: int,
                 only_below: int | None = None) -> Prepared:
    """(id, pixels, seconds, start in epoch ns: for the trace's decode span); NotSmall for an
    image of ``only_below`` pixels or more (upload_checks.prepare)."""
    started_ns = time.time_ns()
    t0 = time.perf_counter()
    pixels = prepare(data, spec, max_pixels, max_header_pixels, only_below)
    image_id = hashlib.sha256(data).hexdigest()
    return image_id, pixels, time.perf_counter() - t0, started_ns


def model_ref(card: ModelCard) -> dict[str, str]:
    """How an answer names a model: ``{"name", "version"}``."""
    return {"name": card.name, "version": card.version}


def all_stored(results: Sequence[ImageResult]) -> bool:
    """True when every vector of these results reached the embedding store."""
    return all(r.stored for r in results)


class Service:
    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 predictor_loader: Callable[[Settings], Predictor] = Predictor.from_settings,
                 tracing: Tracing = OFF) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.tracing = tracing
        self.models = ModelSwap(settings, self.metrics, predictor_loader)
        self.batcher: MicroBatcher[Job, ImageResult] | None = None
        self.store: GuardedStore | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self.state = Lifecycle.STARTING
        self.started_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self._decode_pool = ThreadPoolExecutor(max_workers=s.decode_threads,
                                               thread_name_prefix="decode")
        self.store = GuardedStore(
            partial(open_store, s.embed_store, s.embed_store_max_items, s.embed_store_timeout_s,
                    s.embed_store_ann_index),
            self.metrics, backoff_min_s=s.embed_store_backoff_min_s,
            backoff_max_s=s.embed_store_backoff_max_s)
        await asyncio.to_thread(self.store.start)
        predictor = await self.models.load_first()
        self.batcher = MicroBatcher(
            self._forward, max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms, max_queue=s.max_queue,
            on_batch=self.metrics.observe_batch, finish=self._store_batch)
        await self.batcher.on_inference_thread(predictor.warm_up, s.warmup_batches,
                                               s.max_batch_size)
        self.batcher.start()
        self.state = Lifecycle.READY
        self.metrics.ready.set(1)
        self.metrics.serving(predictor.card, s.max_queue)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth if self.batcher else 0)
        self.models.watch(self.reload_model)
        log.info("ready: %s on %s", predictor.card.name, predictor.device)

    async def reload_model(self, trigger: str) -> str:
        """Replace the served model by what IMGREC_MODEL_DIR leads to now, with no request
        lost (app/serving/model_swap.py); the outcome. Only while READY: at start-up the model
        is still loading, and a draining service is on its way out."""
        if self.state is not Lifecycle.READY:
            log.info("model reload (%s) ignored: the service is %s", trigger, self.state.value)
            return IGNORED
        return await self.models.reload(trigger)

    def begin_drain(self) -> None:
        if self.state in (Lifecycle.STARTING, Lifecycle.READY):
            self.state = Lifecycle.DRAINING
        self.metrics.ready.set(0)

    async def stop(self) -> None:
        self.begin_drain()
        self.state = Lifecycle.STOPPED
        await self.models.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=True)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        log.info("stopped: every accepted image answered")

    @property
    def ready(self) -> bool:
        """Readiness (/readyz, the protocols' ready calls): loaded, warm and not draining."""
        return self.state is Lifecycle.READY

    # -- the rules ---------------------------------------------------------------------------
    def check_accepting(self) -> None:
        """Refuse (503, counted once as ``not_ready``) unless work is accepted now: from ready
        until stop(); a draining service still serves. Skins call it before reading a body."""
        if self.state not in (Lifecycle.READY, Lifecycle.DRAINING) or self.batcher is None:
            raise self._refusal("not_ready", "not_ready", "the service is not ready "
                                f"({self.state.value})")

    @property
    def predictor(self) -> Predictor | None:
        """The served model (None while it loads); a model update replaces it."""
        return self.models.current

    def current_model(self) -> Predictor:
        """The served model now, for one request to keep; 503 while it is still loading."""
        model = self.models.current
        if model is None:
            raise Unavailable("the model is still loading", code="not_ready",
                              retry_after=self.settings.retry_after_s)
        return model

    @property
    def card(self) -> ModelCard:
        """The served model's card; 503 while the model is still loading."""
        return self.current_model().card

    def model_ref(self, results: Sequence[ImageResult] = ()) -> dict[str, str]:
        """The model reference an answer carries, ``{"name", "version"}``: of the model that
        computed ``results`` (one per request), else of the served one."""
        card = results[0].card if results else self.card
        return model_ref(card)

    def top_k(self, k: int) -> int:
        return request_rules.top_k(k, len(self.card.labels))

    def store_key(self, namespace: str | None, model: Predictor | None = None) -> str:
        """The embedding store's key for this model (default: the served one) and caller:
        vectors of another model, or of another API key's namespace, are never found under
        it."""
        return store_key((model or self.current_model()).model_key, namespace)

    def _refusal(self, reason: str, code: str, message: str) -> Unavailable:
        self.metrics.rejections.labels(reason).inc()
        return Unavailable(message, code=code, retry_after=self.settings.retry_after_s)

    # -- inference ---------------------------------------------------------------------------
    async def infer(self, uploads: Sequence[Upload], namespace: str | None = None
                    ) -> list[ImageResult]:
        """Decode in parallel off the loop, queue all images at once, await their results.
        Their vectors are stored under ``store_key(namespace)``, with the cleaned filenames."""
        self.check_accepting()
        model = self.current_model()  # this request's, whatever a model update does meanwhile
        request_rules.image_count(len(uploads), self.settings.max_files)
        prepared = await self._decode_all([u.data for u in uploads], model.card.input)
        names = [request_rules.clean_filename(u.filename) for u in uploads]
        return await self._run(model, [(image_id, pixels, name) for (image_id, pixels), name
                                       in zip(prepared, names, strict=True)], namespace)

    async def _decode_all(self, uploads: list[bytes], spec: InputSpec) -> list[tuple[str, bytes]]:
        """(id, pixels) per upload, decoded on the pool to ``spec``; the first bad one refuses
        the request (naming which file it was)."""
        done: list[Prepared | BaseException | None] = [
            self._decode_small(data, spec) if i < INLINE_PER_REQUEST else None
            for i, data in enumerate(uploads)]
        pooled = [i for i, outcome in enumerate(done) if outcome is None]
        if pooled:
            assert self._decode_pool is not None
            loop, s = asyncio.get_running_loop(), self.settings
            jobs = [loop.run_in_executor(self._decode_pool, _prepare_job, uploads[i], spec,
                                         s.max_image_pixels, s.max_image_header_pixels)
                    for i in pooled]
            for i, result in zip(pooled, await asyncio.gather(*jobs, return_exceptions=True),
                                 strict=True):
                done[i] = result
        span = self.tracing.request_span()
        for index, outcome in enumerate(done):
            if isinstance(outcome, ServiceError):
                self.metrics.rejections.labels(outcome.code).inc()
                if len(uploads) > 1:
                    outcome.message = f"file {index + 1} of {len(uploads)}: {outcome.message}"
                raise outcome
            if isinstance(outcome, BaseException):
                raise outcome
        out: list[tuple[str, bytes]] = []
        for index, (image_id, pixels, seconds, started_ns) in enumerate(done):  # type: ignore[misc]
            self.metrics.decode_seconds.observe(seconds)
            out.append((image_id, pixels))
            if span is not None:
                self.tracing.child(span, "decode", started_ns, started_ns + int(seconds * 1e9),
                                   {"imgrec.image.index": index,
                                    "imgrec.image.bytes": len(uploads[index])})
        return out

    def _decode_small(self, data: bytes, spec: InputSpec) -> Prepared | Exception | None:
        """On the event loop, an upload that decodes to few pixels: for a 28x28 PNG the two
        thread hops of the pool cost more than the decode. None: a larger one, for the pool.
        A bad upload's refusal is returned, as the pool's gather returns it."""
        s = self.settings
        if s.decode_inline_pixels <= 0:
            return None
        try:
            return _prepare_job(data, spec, s.max_image_pixels, s.max_image_header_pixels,
                                s.decode_inline_pixels)
        except NotSmall:
            return None
        except Exception as e:  # answered as the pool's outcomes are
            return e

    async def infer_pixels(self, pixels: np.ndarray, namespace: str | None = None
                           ) -> list[ImageResult]:
        """Images the caller decoded: uint8 (N, C, H, W) at the card's input size. They join the
        same batches as uploads; an image's id is the sha256 of its (C, H, W) pixel bytes."""
        self.check_accepting()
        model = self.current_model()
        if pixels.dtype != np.uint8 or pixels.shape[1:] != model.image_shape:
            raise BadRequest(f"pixels must be uint8 (N, "
                             f"{', '.join(map(str, model.image_shape))}), got "
                             f"{pixels.dtype} {tuple(pixels.shape)}", code="bad_pixels")
        request_rules.image_count(len(pixels), self.settings.max_files)
        images = [image.tobytes() for image in np.ascontiguousarray(pixels)]
        return await self._run(model, [(hashlib.sha256(b).hexdigest(), b, None)
                                       for b in images], namespace)

    async def _run(self, model: Predictor, images: list[tuple[str, bytes, str | None]],
                   namespace: str | None) -> list[ImageResult]:
        """Queue a request's (id, pixels, filename) images at once, all for ``model``, and
        await their results; the one queueing path of uploads and decoded pixels alike."""
        assert self.batcher is not None
        key = self.store_key(namespace, model)
        span = self.tracing.request_span()
        traced = span.get_span_context() if span is not None else None
        jobs = [Job(image_id, pixels, model, key, name, traced)
                for image_id, pixels, name in images]
        submitted_ns = time.time_ns() if span is not None else 0
        try:
            futures = self.batcher.submit_many(jobs, self.settings.request_timeout_ms / 1000.0)
        except QueueFull as e:
            raise self._refusal("queue_full", "overloaded", f"{e}; retry later") from None
        except Closed as e:
            raise self._refusal("shutting_down", "shutting_down", str(e)) from None
        try:
            results = list(await asyncio.gather(*futures))
        except batcher.DeadlineExceeded as e:
            for f in futures:  # the rest of this request is no longer wanted
                f.cancel()
            self.metrics.rejections.labels("deadline").inc()
            raise DeadlineExceeded(str(e)) from None
        except Exception as e:  # the batch failed: this request fails, the service goes on
            for f in futures:
                f.cancel()
            log.exception("inference failed")
            raise InferenceFailed(f"inference failed: {e}") from None
        if span is not None:
            self.tracing.request_batches(span, submitted_ns, [r.batch for r in results])
        return results

    def _forward(self, jobs: list[Job]) -> list[ImageResult]:
        """On the inference thread: each job on the model its request took. Right after a
        model update a batch may hold requests of both models: one forward pass per model, so
        that none mixes two."""
        by_model: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            by_model.setdefault(id(job.model), []).append(i)
        traced = self._batch_span(jobs) if self.tracing.on else None
        results: list[ImageResult | None] = [None] * len(jobs)
        for indices in by_model.values():
            model = jobs[indices[0]].model
            predictions = model.forward([jobs[i].pixels for i in indices])
            for i, p in zip(indices, predictions, strict=True):
                job = jobs[i]
                results[i] = ImageResult(job.image_id, p, model.card, job.store_key,
                                         job.filename)
        if traced is not None:
            span, trace = traced
            trace.end_ns = time.time_ns()
            span.end(end_time=trace.end_ns)
            for r in results:
                r.batch = trace  # type: ignore[union-attr]  # every index is filled above
        return results  # type: ignore[return-value]  # every index is filled above

    def _batch_span(self, jobs: list[Job]) -> tuple[Span, BatchTrace] | None:
        """The batch's own span, linked to the traced requests it serves (tracing.py)."""
        parents = [job.traced for job in jobs if job.traced is not None]
        card = jobs[0].model.card
        return self.tracing.start_batch(parents, len(jobs), {
            "imgrec.model.name": card.name, "imgrec.model.version": card.version})

    def _store_batch(self, jobs: list[Job], results: Sequence[ImageResult]) -> None:
        """On the batcher's finish thread, while the next batch computes: every vector goes to
        the store before its request is answered, so a GET /embed right after finds it. A
        store outage only marks the results as not stored (the guard never raises)."""
        assert self.store is not None
        by_key: dict[str, list[ImageResult]] = {}
        for job, r in zip(jobs, results, strict=True):
            by_key.setdefault(job.store_key, []).append(r)
        trace = results[0].batch if results else None
        if trace is not None:
            trace.store_start_ns = time.time_ns()
        for key, group in by_key.items():
            started = time.perf_counter()
            stored = self.store.put_many(key, [(r.id, r.prediction.embedding) for r in group],
                                         [r.filename for r in group])
            if stored:
                self.metrics.store_write_seconds.observe(time.perf_counter() - started)
            for r in group:
                r.stored = stored
        if trace is not None:
            trace.stored = all(r.stored for r in results)
            trace.store_end_ns = time.time_ns()

    # -- the store: lookups and search ---------------------------------------------------------
    async def _store_call(self, call: Callable[[GuardedStore], T]) -> T:
        """One hop to a worker thread for a store read; the store's refusals as the Service's."""
        if self.store is None or self.models.current is None:
            raise self._refusal("not_ready", "not_ready", "the service is not ready")
        store = self.store
        try:
            return await asyncio.to_thread(call, store)
        except SearchUnavailable as e:
            raise SearchNotSupported(str(e)) from None
        except StoreUnavailable:
            raise self._refusal("store_unavailable", "store_unavailable",
                                "the embedding store is unavailable; retry later") from None

    async def lookup(self, ids: Sequence[str], namespace: str | None = None,
                     model: Predictor | None = None) -> list[tuple[str, np.ndarray]]:
        """(id, vector) for each id, in the order asked, of ``model`` (default: the served
        one); 404 naming the unknown ones, 422 for malformed ids, 503 while the store is down."""
        wanted = request_rules.image_ids(ids)
        model = model or self.models.current
        key = self.store_key(namespace, model) if model is not None else ""
        with self.tracing.span("store read", {"imgrec.ids": len(wanted)}):
            found = await self._store_call(lambda store: store.get_many(key, wanted))
        unknown = [i for i in dict.fromkeys(wanted) if i not in found]
        if unknown:
            raise UnknownId("no embedding stored for id(s): " + ", ".join(unknown))
        return [(i, found[i]) for i in wanted]

    async def search_uploads(self, uploads: Sequence[Upload], k: int,
                             namespace: str | None = None
                             ) -> list[tuple[ImageResult, list[Neighbor]]]:
        """Embed and store the uploads (as infer does), then each one's k nearest stored
        images, never itself: one worker-thread hop for all the searches."""
        request_rules.neighbours(k)
        results = await self.infer(uploads, namespace)

        def run(store: GuardedStore) -> list[list[Neighbor]]:  # in the space they were made in
            return [store.search(r.store_key, r.prediction.embedding, k, r.id) for r in results]

        with self.tracing.span("search", {"imgrec.k": k, "imgrec.images": len(results)}):
            found = await self._store_call(run)
        return list(zip(results, found, strict=True))

    async def search_stored(self, image_id: str, k: int, namespace: str | None = None,
                            model: Predictor | None = None
                            ) -> tuple[str, str | None, list[Neighbor]]:
        """(id, filename, neighbours) of an image stored by ``model`` (default: the served
        one); 404 when it is not stored."""
        request_rules.neighbours(k)
        (wanted,) = request_rules.image_ids([image_id])
        model = model or self.models.current
        key = self.store_key(namespace, model) if model is not None else ""

        def run(store: GuardedStore) -> tuple[str | None, list[Neighbor]] | None:
            found = store.get_many(key, [wanted])
            if wanted not in found:
                return None
            return (store.filenames(key, [wanted]).get(wanted),
                    store.search(key, found[wanted], k, wanted))

        with self.tracing.span("search", {"imgrec.k": k, "imgrec.images": 1}):
            answer = await self._store_call(run)
        if answer is None:
            raise UnknownId(f"no embedding stored for id {wanted}")
        return wanted, answer[0], answer[1]
