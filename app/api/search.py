"""Similar images: POST /search (by upload) and GET /search?id= (by a stored image's id).

Both answer, per query image, its k nearest stored images by cosine similarity of their
feature vectors, best first, never the query image itself. An uploaded image is embedded and
stored exactly as POST /embed does (the Service's same path and store key), then searched; the
answer says whether it was stored (X-Imgrec-Stored), as /embed's does.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from app.api.deps import ServiceDep, answered, namespace_of, stored_header, uploads_of
from app.api.errors import JSONBytes
from app.api.openapi import UPLOAD_ERRORS, errors, image_upload_body
from app.api.query import K
from app.api.schemas import SearchResponse
from app.serving.request_rules import MAX_K, SHA256_ANY_CASE
from app.serving.service import model_ref
from app.serving.store.vector_index import Neighbor

router = APIRouter()

SEARCH_ERRORS = {**UPLOAD_ERRORS, **errors({
    501: "the store cannot search (a Redis server without the search module)",
    503: "overloaded (queue full), warming up, shutting down, or the embedding store is "
         "unavailable"})}
LOOKUP_ERRORS = errors({
    404: "no image stored under this id",
    422: f"missing or malformed id, or k outside 1..{MAX_K}",
    501: "the store cannot search (a Redis server without the search module)",
    503: "not ready, or the embedding store is unavailable",
})


def _neighbors(found: list[Neighbor]) -> list[dict[str, Any]]:
    return [{"id": n.id, "score": n.score, "filename": n.filename} for n in found]


@router.post("/search", openapi_extra=image_upload_body(), responses=SEARCH_ERRORS,
             response_model=SearchResponse,
             summary="Stored images most similar to each uploaded image (which is stored too)")
async def search_upload(request: Request, service: ServiceDep,
                        k: Annotated[int, K.query()] = K.default) -> JSONBytes:
    found = await service.search_uploads(await uploads_of(request, service), k,
                                         namespace_of(request))
    results = [r for r, _ in found]
    answered(request, results)
    return JSONBytes({"model": service.model_ref(results), "results": [
        {"id": r.id, "filename": r.filename, "neighbors": _neighbors(neighbors)}
        for r, neighbors in found]}, headers=stored_header(results))


@router.get("/search", responses=LOOKUP_ERRORS, response_model=SearchResponse,
            summary="Stored images most similar to an image already stored")
async def search_stored(
    request: Request,
    service: ServiceDep,
    id: Annotated[str, Query(description="sha256 hex of a stored image's bytes",
                             pattern=SHA256_ANY_CASE)],
    k: Annotated[int, K.query()] = K.default,
) -> JSONBytes:
    model = service.current_model()  # the stored vectors searched are this model's
    image_id, filename, neighbors = await service.search_stored(id, k, namespace_of(request),
                                                                model)
    return JSONBytes({"model": model_ref(model.card), "results": [
        {"id": image_id, "filename": filename, "neighbors": _neighbors(neighbors)}]})
