"""The JSON skin's routes: /predict, /embed, /model, /healthz, /readyz, /metrics. No torch here.

Each route parses its request, calls the Service and shapes the answer; every rule (ready,
bounds, namespace, filenames, stored or not) is the Service's, and its refusals are answered by
the one handler in app/api/errors.py.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from prometheus_client import generate_latest

from app.api.deps import ServiceDep, answered, namespace_of, stored_header, uploads_of
from app.api.errors import JSONBytes
from app.api.openapi import PROMETHEUS_TEXT, UPLOAD_ERRORS, errors, image_upload_body
from app.api.query import EMBEDDING, EXPLAIN, NORMALIZE, TOP_K
from app.api.schemas import EmbedResponse, Health, ModelInfo, PredictResponse, Ready
from app.model.cam import input_map, total_stride
from app.model.card import ModelCard
from app.serving.errors import InvalidParameter, Unavailable
from app.serving.request_rules import MAX_LOOKUP_IDS, SHA256_ANY_CASE, unit
from app.serving.service import ImageResult, Service, model_ref

router = APIRouter()


@router.post("/predict", openapi_extra=image_upload_body(), responses=UPLOAD_ERRORS,
             response_model=PredictResponse, summary="Classify one or more uploaded images")
async def predict(
    request: Request,
    service: ServiceDep,
    top_k: Annotated[int, TOP_K.query()] = TOP_K.default,
    embedding: Annotated[bool, EMBEDDING.query()] = EMBEDDING.default,
    explain: Annotated[bool, EXPLAIN.query()] = EXPLAIN.default,
) -> JSONBytes:
    service.check_accepting()  # before the body is read: a refusal costs no upload
    top_k = service.top_k(top_k)
    if explain and not service.current_model().explains:
        raise InvalidParameter("explain=true needs the class maps, which this model's "
                               "inference graph does not output (exported before them: "
                               "imgrec export DIR again)", code="explain_unavailable")
    results = await service.infer(await uploads_of(request, service), namespace_of(request))
    answered(request, results)
    out = [_predict_item(r, top_k, embedding, explain) for r in results]
    return JSONBytes({"model": service.model_ref(results), "results": out},
                     headers=stored_header(results))


def _predict_item(r: ImageResult, top_k: int, embedding: bool, explain: bool) -> dict[str, Any]:
    labels = r.card.labels  # of the model that computed it
    p = r.prediction
    order = np.argsort(-p.probs, kind="stable")[:top_k]
    item: dict[str, Any] = {
        "id": r.id, "filename": r.filename,
        "labels": [{"label": labels[i], "index": int(i), "score": float(p.probs[i])}
                   for i in order],
        "unknown": p.unknown, "ood_score": p.ood_score,
    }
    if embedding:
        item["embedding"] = p.embedding
    if explain:
        item["cam"] = cam_json(r.card, int(order[0]), p.cam)
    return item


def cam_json(card: ModelCard, label: int, cells: np.ndarray | None) -> dict[str, Any] | None:
    """``{"label", "width", "height", "values"}``: the top label's map over the model's input
    (size x size, as the card's resize rule makes it), row-major, in [0, 1]."""
    if cells is None:
        return None
    size = card.input.size
    values = input_map(cells[None], 0, size, total_stride(card.arch))
    return {"label": card.labels[label], "index": label, "width": size, "height": size,
            "values": values.ravel()}


@router.post("/embed", openapi_extra=image_upload_body(), responses=UPLOAD_ERRORS,
             response_model=EmbedResponse,
             summary="Feature vectors of uploaded images (kept in the embedding store)")
async def embed(
    request: Request,
    service: ServiceDep,
    normalize: Annotated[bool, NORMALIZE.query()] = NORMALIZE.default,
) -> JSONBytes:
    results = await service.infer(await uploads_of(request, service), namespace_of(request))
    answered(request, results)
    out = [{"id": r.id, "embedding": unit(r.prediction.embedding) if normalize
            else r.prediction.embedding} for r in results]
    return JSONBytes({"model": service.model_ref(results), "results": out},
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
    normalize: Annotated[bool, NORMALIZE.query()] = NORMALIZE.default,
) -> JSONBytes:
    model = service.current_model()  # the vectors read are this model's, and named so
    found = await service.lookup(id, namespace_of(request), model)
    return JSONBytes({"model": model_ref(model.card),
                      "results": [{"id": i, "embedding": unit(v) if normalize else v}
                                  for i, v in found]})


@router.get("/model", response_model=ModelInfo,
            responses=errors({503: "the model is still loading"}),
            summary="The model card's facts, device, dtype and batching settings")
async def model_info(service: ServiceDep) -> JSONBytes:
    p, s = service.current_model(), service.settings  # one model, even during an update
    card = p.card
    return JSONBytes({
        "name": card.name, "version": card.version, "description": card.description,
        "preset": card.preset, "parameters": card.parameters, "labels": card.labels,
        "input": card.input.model_dump(), "embedding_dim": card.embedding_dim,
        "weights_sha256": card.weights_sha256, "metrics": {
            k: v for k, v in card.metrics.items() if k != "confusion_matrix"},
        "device": str(p.device), "dtype": p.dtype, "engine": p.engine.name,
        "instance": p.instance, "calibration": p.scores.describe(),
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
    if service.ready:
        return JSONBytes({"status": "ready"})
    raise _not_ready(service)


def _not_ready(service: Service) -> Unavailable:
    # readiness probes are not refused work: not counted as a rejection
    return Unavailable(f"not ready: {service.state.value}", code="not_ready",
                       retry_after=service.settings.retry_after_s)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format 0.0.4",
                             "content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}}})
async def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=PROMETHEUS_TEXT)
