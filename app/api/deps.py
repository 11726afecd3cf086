"""What the JSON routes share: the Service, the caller's namespace, the uploads of a request,
and the headers every storing answer carries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, Request

from app.api.multipart import read_uploads
from app.serving.service import ImageResult, Service, Upload, all_stored

STORED_HEADER = "X-Imgrec-Stored"


async def get_service(request: Request) -> Service:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, per request
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def namespace_of(request: Request) -> str | None:
    """The caller's store namespace, set by the API-key middleware (None without keys)."""
    return getattr(request.state, "namespace", None)


async def uploads_of(request: Request, service: Service) -> list[Upload]:
    """The request's image parts, once the Service accepts work (checked before the body is
    read, so a refused request costs no upload)."""
    service.check_accepting()
    s = service.settings
    with service.tracing.span("read upload") as span:
        uploads = await read_uploads(request, s.max_upload_bytes, s.max_files)
        if span is not None:
            span.set_attributes({"imgrec.files": len(uploads),
                                 "imgrec.bytes": sum(len(u.data) for u in uploads)})
    return uploads


def answered(request: Request, results: Sequence[object]) -> None:
    """Tell the metrics middleware how many images this request answered."""
    request.state.images = len(results)


def stored_header(results: Sequence[ImageResult]) -> dict[str, str]:
    """`X-Imgrec-Stored: true` when every vector of the response reached the embedding store;
    `false` during a store outage (the answer is as good, GET /embed will not find them)."""
    return {STORED_HEADER: "true" if all_stored(results) else "false"}
