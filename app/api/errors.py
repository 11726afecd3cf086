"""The JSON skin's errors: {"error": {"code", "message"}} with the right status, for every
failure, built here and nowhere else.

The Service's refusals (``ServiceError``, app/serving/errors.py) are mapped by
``service_error_response`` -- one mapping, used by the exception handler the app installs and by
the fast path, so the routes never catch them. ``ApiError`` is the same kind of refusal for what
only HTTP knows (a page asset that does not exist), so the one mapping answers it too.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.serving.errors import ServiceError


class JSONBytes(Response):
    """orjson with numpy support: embeddings serialise without a Python list in between."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ApiError(ServiceError):
    """A refusal only HTTP knows, with any extra headers it needs."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, status=status)
        self.headers = headers


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONBytes:
    return JSONBytes({"error": {"code": code, "message": message}}, status_code=status,
                     headers=headers)


def service_error_response(e: ServiceError) -> JSONBytes:
    """The one mapping of the Service's refusals to the JSON skin's answer."""
    headers = dict(e.headers or {}) if isinstance(e, ApiError) else {}
    if e.retry_after is not None:
        headers["Retry-After"] = str(e.retry_after)
    return error_response(e.status, e.code, e.message, headers or None)


def internal_error_response(e: BaseException) -> JSONBytes:
    """A bug: this request fails with a 500 that names no detail; the process goes on."""
    return error_response(500, "internal_error", f"{type(e).__name__}: internal error")


HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
              413: "too_large", 415: "unsupported_media_type", 422: "invalid_parameters",
              503: "unavailable", 504: "deadline_exceeded"}


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's own 405 names only the methods
    of the first route that matched the path (``OPTIONS /embed`` said ``Allow: POST`` although
    ``GET /embed`` exists)."""
    routes = request.app.router.routes
    methods = [m for m in METHODS
               if any(route.matches({**request.scope, "method": m})[0] == Match.FULL
                      for route in routes)]
    return ", ".join(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONBytes:
        return service_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONBytes:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_parameters", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONBytes:
        code = HTTP_CODES.get(exc.status_code, "error")
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONBytes:
        # Starlette re-raises it after this answer, so uvicorn logs the traceback
        return internal_error_response(exc)
