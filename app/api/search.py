"""Similar images: POST /search (by upload) and GET /search?id= (by a stored image's id).

Both answer, per query image, its k nearest stored images by cosine similarity of their
feature vectors, best first, never the query image itself. An uploaded image is embedded and
stored exactly as POST /embed does (same batcher, same store key), then searched.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from app.api.errors import ApiError, JSONBytes
from app.api.routes import ERRORS_DOC, MULTIPART_DOC, SHA256, ServiceDep, _infer, _model_ref
from app.serving.service import Service, ServiceError
from app.serving.store.vector_index import Neighbor, clean_filename

router = APIRouter()
MAX_K = 100

K = Annotated[int, Query(ge=1, le=MAX_K, description=f"neighbours per image (1..{MAX_K})")]


class ModelRef(BaseModel):
    name: str
    version: str


class NeighborOut(BaseModel):
    id: str = Field(description="sha256 hex of the stored image's bytes")
    score: float = Field(ge=-1.0, le=1.0, description="cosine similarity (1.0 = same "
                         "direction)")
    filename: str | None = Field(description="the filename given when it was stored")


class SearchResult(BaseModel):
    id: str = Field(description="sha256 hex of the query image's bytes")
    filename: str | None
    neighbors: list[NeighborOut] = Field(description="best first; at most k")


class SearchResponse(BaseModel):
    model: ModelRef
    results: list[SearchResult] = Field(description="one per query image, in order")


_ERROR_BODY = {"application/json": {"schema": {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"},
                                            "message": {"type": "string"}}}}}}}
SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {**doc, "content": _ERROR_BODY} for status, doc in {
        **ERRORS_DOC,
        500: {"description": "the forward pass failed (this request only)"},
        501: {"description": "the store cannot search (a Redis server without the search "
                             "module)"},
    }.items()}
LOOKUP_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": _ERROR_BODY} for status, text in {
        404: "no image stored under this id",
        422: "missing or malformed id, or k outside 1..100",
        501: "the store cannot search (a Redis server without the search module)",
        503: "not ready (Retry-After)",
    }.items()}


def _neighbors(found: list[Neighbor]) -> list[dict[str, Any]]:
    return [{"id": n.id, "score": n.score, "filename": n.filename} for n in found]


def _api_error(e: ServiceError) -> ApiError:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    return ApiError(e.status, e.code, e.message, headers)


async def _search(service: Service, query: Any, k: int, exclude: str,
                  namespace: str | None) -> list[dict[str, Any]]:
    try:
        return _neighbors(await service.search(query, k, exclude, namespace=namespace))
    except ServiceError as e:
        raise _api_error(e) from None


@router.post("/search", openapi_extra=MULTIPART_DOC, responses=SEARCH_ERRORS,
             response_model=SearchResponse,
             summary="Stored images most similar to each uploaded image (which is stored too)")
async def search_upload(request: Request, service: ServiceDep, k: K = 10) -> JSONBytes:
    namespace = getattr(request.state, "namespace", None)
    filenames, results = await _infer(request, service)
    out = []
    for r, filename in zip(results, filenames, strict=True):
        out.append({"id": r.id, "filename": clean_filename(filename),
                    "neighbors": await _search(service, r.prediction.embedding, k, r.id,
                                               namespace)})
    return JSONBytes({"model": _model_ref(service), "results": out})


@router.get("/search", responses=LOOKUP_ERRORS, response_model=SearchResponse,
            summary="Stored images most similar to an image already stored")
async def search_stored(
    request: Request,
    service: ServiceDep,
    id: Annotated[str, Query(description="sha256 hex of a stored image's bytes",
                             pattern="^[0-9a-fA-F]{64}$")],
    k: K = 10,
) -> JSONBytes:
    namespace = getattr(request.state, "namespace", None)
    image_id = id.lower()
    if not SHA256.match(image_id):
        raise ApiError(422, "invalid_parameters", "id: not a sha256 hex digest")
    try:
        found = await service.search_stored(image_id, k, namespace=namespace)
    except ServiceError as e:
        raise _api_error(e) from None
    if found is None:
        raise ApiError(404, "unknown_id", f"no embedding stored for id {image_id}")
    filename, neighbors = found
    return JSONBytes({"model": _model_ref(service), "results": [
        {"id": image_id, "filename": filename, "neighbors": _neighbors(neighbors)}]})
