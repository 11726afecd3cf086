"""The route table's fast routes (POST /predict and /embed) without FastAPI's per-request
machinery.

FastAPI's routing, dependency solving and exception layers run for every request. This
middleware parses the routes' query parameters with the very same declarations
(app/api/query.py) and calls the very same route functions (app/api/routes.py), so behaviour,
errors and the OpenAPI description stay those of the FastAPI routes; everything else goes
through FastAPI as usual. The request id, server span, metrics and access line come from
app/api/request_middleware.py, outside both, and the upload's and the Service's spans from the
code both share, so a fast request is traced and logged as a routed one is
(tests/api/test_tracing.py compares them).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import internal_error_response, service_error_response
from app.api.query import EMBEDDING, EXPLAIN, NORMALIZE, TOP_K
from app.api.route_table import FAST
from app.api.routes import embed, predict
from app.serving.errors import ServiceError
from app.serving.service import Service

log = logging.getLogger("imgrec.api")
Params = dict[str, list[str]]
Handler = Callable[[Request, Service, Params], Awaitable[Response]]


async def _predict(request: Request, service: Service, params: Params) -> Response:
    return await predict(request, service, top_k=TOP_K.parse(params),
                         embedding=EMBEDDING.parse(params), explain=EXPLAIN.parse(params))


async def _embed(request: Request, service: Service, params: Params) -> Response:
    return await embed(request, service, normalize=NORMALIZE.parse(params))


HANDLERS: dict[tuple[str, str], Handler] = {("POST", "/predict"): _predict,
                                            ("POST", "/embed"): _embed}
assert set(HANDLERS) == FAST, "every fast route of the route table has a handler here"


class FastPathMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = HANDLERS.get((scope.get("method", ""), scope["path"])) \
            if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        response: Response
        try:
            # blank values kept: "top_k=" is a bad integer, not an absent one
            params = parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            response = await handler(request, scope["app"].state.service, params)
        except ServiceError as e:
            response = service_error_response(e)
        except Exception as e:  # a bug: the same answer as the app's catch-all handler
            log.exception("%s %s failed", scope["method"], scope["path"])
            response = internal_error_response(e)
        await response(scope, receive, send)
