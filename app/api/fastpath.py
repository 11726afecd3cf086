"""POST /predict and /embed without FastAPI's per-request machinery.

FastAPI's routing, dependency solving and exception layers run for every request. This
middleware parses the two routes' three query parameters itself and calls the very same route
functions (app/api/routes.py), so behaviour, errors and the OpenAPI description stay those of
the FastAPI routes; everything else goes through FastAPI as usual.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import ApiError, error_response
from app.api.routes import embed, predict

TRUE = {"true", "1", "yes", "on", "t", "y"}
FALSE = {"false", "0", "no", "off", "f", "n"}
# what the OpenAPI document's "integer" means: ASCII digits (int() would also take "1_0", " 5"
# and non-ASCII digits)
INTEGER = re.compile(r"[+-]?[0-9]+")


def _last(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[-1] if values else None


def _bool(params: dict[str, list[str]], name: str, default: bool) -> bool:
    raw = _last(params, name)
    if raw is None:
        return default
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise ApiError(422, "invalid_parameters", f"{name}: Input should be a valid boolean")


def _int(params: dict[str, list[str]], name: str, default: int, minimum: int) -> int:
    raw = _last(params, name)
    if raw is None:
        return default
    if not INTEGER.fullmatch(raw):
        raise ApiError(422, "invalid_parameters", f"{name}: Input should be a valid integer")
    value = int(raw)
    if value < minimum:
        raise ApiError(422, "invalid_parameters",
                       f"{name}: Input should be greater than or equal to {minimum}")
    return value


class FastPathMiddleware:
    ROUTES = ("/predict", "/embed")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"] not in self.ROUTES):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        response: Response
        try:
            # blank values kept: "top_k=" is a bad integer, not an absent one
            params = parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            service = scope["app"].state.service
            if scope["path"] == "/predict":
                response = await predict(request, service,
                                         top_k=_int(params, "top_k", 5, 1),
                                         embedding=_bool(params, "embedding", False))
            else:
                response = await embed(request, service,
                                       normalize=_bool(params, "normalize", False))
        except ApiError as e:
            response = error_response(e.status, e.code, e.message, e.headers)
        except Exception as e:  # the same answer as the app's catch-all handler
            response = error_response(500, "internal_error",
                                      f"{type(e).__name__}: internal error")
        await response(scope, receive, send)
