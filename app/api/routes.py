"""HTTP routes: /predict, /embed, /model, /healthz, /readyz, /metrics. No torch here."""

from __future__ import annotations

import re
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client import generate_latest

from app.api.errors import ApiError, JSONBytes
from app.api.multipart import read_uploads
from app.api.openapi import PROMETHEUS_TEXT, errors, image_upload_body
from app.api.schemas import EmbedResponse, Health, ModelInfo, PredictResponse, Ready
from app.serving.service import ImageResult, Service, ServiceError

router = APIRouter()
SHA256 = re.compile(r"^[0-9a-f]{64}$")
STORED_HEADER = "X-Imgrec-Stored"
SHA256_ANY_CASE = "^[0-9a-fA-F]{64}$"  # ids are lower-cased before the lookup
# 100 ids are a 6.8 kB query: within nginx's default 8 kB request line and uvicorn's (httptools)
# header limit. 1000 (68 kB) were refused by the HTTP parser before reaching the route.
MAX_LOOKUP_IDS = 100

UPLOAD_ERRORS = errors({
    400: "malformed multipart body, or no part named `file`",
    413: "body over IMGREC_MAX_UPLOAD_BYTES, more than IMGREC_MAX_FILES files, or an image over "
         "IMGREC_MAX_IMAGE_PIXELS",
    415: "a file is not an image in an allowed format, or cannot be decoded",
    422: "bad query parameters",
    500: "the forward pass failed (this request only; the service goes on)",
    503: "overloaded (queue full), warming up or shutting down",
    504: "the request's deadline (IMGREC_REQUEST_TIMEOUT_MS) passed while queued",
})
NOT_READY = errors({503: "the model is still loading"})
# the names app/api/search.py uses: the same upload body, the same error descriptions
MULTIPART_DOC = image_upload_body()
ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    status: {"description": doc["description"]} for status, doc in UPLOAD_ERRORS.items()}


async def get_service(request: Request) -> Service:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, per request
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def _infer(request: Request, service: Service) -> tuple[list[str | None], list[ImageResult]]:
    s = service.settings
    if not service.serving:  # a draining service still serves (the lame duck)
        raise ApiError(503, "not_ready", "the service is not ready (warming up or shutting down)",
                       {"Retry-After": str(s.retry_after_s)})
    uploads = await read_uploads(request, s.max_upload_bytes, s.max_files)
    try:
        results = await service.infer([u.data for u in uploads], namespace=namespace_of(request),
                                      filenames=[u.filename for u in uploads])
    except ServiceError as e:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        raise ApiError(e.status, e.code, e.message, headers) from None
    request.state.images = len(results)
    return [u.filename for u in uploads], results


def namespace_of(request: Request) -> str | None:
    """The caller's store namespace, set by the API-key middleware (None without keys)."""
    return getattr(request.state, "namespace", None)


def stored_header(results: list[ImageResult]) -> dict[str, str]:
    """`X-Imgrec-Stored: true` when every vector of the response reached the embedding store;
    `false` during a store outage (the answer is as good, GET /embed will not find them)."""
    return {STORED_HEADER: "true" if all(r.stored for r in results) else "false"}


def _model_ref(service: Service) -> dict[str, str]:
    assert service.predictor is not None
    card = service.predictor.card
    return {"name": card.name, "version": card.version}


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


@router.post("/predict", openapi_extra=image_upload_body(), responses=UPLOAD_ERRORS,
             response_model=PredictResponse, summary="Classify one or more uploaded images")
async def predict(
    request: Request,
    service: ServiceDep,
    top_k: Annotated[int, Query(ge=1, description="labels per image (1..classes)")] = 5,
    embedding: Annotated[bool, Query(description="add each image's feature vector")] = False,
) -> JSONBytes:
    if service.predictor is None:
        raise ApiError(503, "not_ready", "the model is still loading",
                       {"Retry-After": str(service.settings.retry_after_s)})
    labels = service.predictor.card.labels
    if top_k > len(labels):
        raise ApiError(422, "invalid_parameters",
                       f"top_k: must be between 1 and {len(labels)} (the model's classes)")
    filenames, results = await _infer(request, service)
    out = []
    for filename, r in zip(filenames, results, strict=True):
        probs = r.prediction.probs
        order = np.argsort(-probs, kind="stable")[:top_k]
        item: dict[str, Any] = {
            "id": r.id, "filename": filename,
            "labels": [{"label": labels[i], "index": int(i), "score": float(probs[i])}
                       for i in order],
        }
        if embedding:
            item["embedding"] = r.prediction.embedding
        out.append(item)
    return JSONBytes({"model": _model_ref(service), "results": out},
                     headers=stored_header(results))


@router.post("/embed", openapi_extra=image_upload_body(), responses=UPLOAD_ERRORS,
             response_model=EmbedResponse,
             summary="Feature vectors of uploaded images (kept in the embedding store)")
async def embed(
    request: Request,
    service: ServiceDep,
    normalize: Annotated[bool, Query(description="scale each vector to unit length")] = False,
) -> JSONBytes:
    _, results = await _infer(request, service)
    out = [{"id": r.id, "embedding": _unit(r.prediction.embedding) if normalize
            else r.prediction.embedding} for r in results]
    return JSONBytes({"model": _model_ref(service), "results": out},
                     headers=stored_header(results))


@router.get("/embed", response_model=EmbedResponse,
            responses=errors({404: "unknown ids (named in the message)",
                              422: f"missing or malformed id, or more than {MAX_LOOKUP_IDS}",
                              503: "the embedding store is unavailable, or not ready"}),
            summary="Vectors of images the service has already processed")
async def embed_lookup(
    request: Request,
    service: ServiceDep,
    id: Annotated[list[str], Query(description="sha256 hex of an image's bytes; repeatable",
                                   min_length=1, max_length=MAX_LOOKUP_IDS,
                                   json_schema_extra={"items": {"type": "string",
                                                                "pattern": SHA256_ANY_CASE}})],
    normalize: Annotated[bool, Query(description="scale each vector to unit length")] = False,
) -> JSONBytes:
    ids = [i.lower() for i in id]
    bad = [i for i in ids if not SHA256.match(i)]
    if bad:
        raise ApiError(422, "invalid_parameters",
                       f"id: not a sha256 hex digest: {', '.join(bad[:5])}")
    if len(ids) > MAX_LOOKUP_IDS:
        raise ApiError(422, "invalid_parameters", f"id: at most {MAX_LOOKUP_IDS} ids per request")
    try:
        found = await service.lookup(ids, namespace=namespace_of(request))
    except ServiceError as e:
        raise ApiError(e.status, e.code, e.message, {"Retry-After": str(e.retry_after)}) from None
    unknown = [i for i in dict.fromkeys(ids) if i not in found]
    if unknown:
        raise ApiError(404, "unknown_id", "no embedding stored for id(s): " + ", ".join(unknown))
    return JSONBytes({"model": _model_ref(service),
                      "results": [{"id": i, "embedding": _unit(found[i]) if normalize
                                   else found[i]} for i in ids]})


@router.get("/model", response_model=ModelInfo, responses=NOT_READY,
            summary="The model card's facts, device, dtype and batching settings")
async def model_info(service: ServiceDep) -> JSONBytes:
    if service.predictor is None:
        raise ApiError(503, "not_ready", "the model is still loading",
                       {"Retry-After": str(service.settings.retry_after_s)})
    p, s = service.predictor, service.settings
    card = p.card
    return JSONBytes({
        "name": card.name, "version": card.version, "description": card.description,
        "preset": card.preset, "parameters": card.parameters, "labels": card.labels,
        "input": card.input.model_dump(), "embedding_dim": card.embedding_dim,
        "weights_sha256": card.weights_sha256, "metrics": {
            k: v for k, v in card.metrics.items() if k != "confusion_matrix"},
        "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
        "engine": p.engine.name,
        "instance": p.instance,
        "batching": {"max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms,
                     "max_queue": s.max_queue, "request_timeout_ms": s.request_timeout_ms},
        "limits": {"max_files": s.max_files, "max_upload_bytes": s.max_upload_bytes,
                   "max_image_pixels": s.max_image_pixels},
    })


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> JSONBytes:
    return JSONBytes({"status": "ok"})


@router.get("/readyz", summary="Readiness: model loaded and warm, not draining",
            response_model=Ready, responses=errors({503: "warming up or draining"}))
async def readyz(service: ServiceDep) -> JSONBytes:
    if service.ready and not service.draining:
        return JSONBytes({"status": "ready"})
    state = "draining" if service.draining else "starting"
    raise ApiError(503, "not_ready", f"not ready: {state}",
                   {"Retry-After": str(service.settings.retry_after_s)})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format 0.0.4",
                             "content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}}})
async def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=PROMETHEUS_TEXT)
