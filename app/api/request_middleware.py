"""The edges of every HTTP request, as one plain ASGI middleware (the outermost of the app's, so
every route, the fast path and the Open Inference Protocol's REST skin alike get them; a
BaseHTTPMiddleware would cost far more per request):

* its request id: the client's ``X-Request-ID`` when well formed, else a new one; answered in
  every response's ``X-Request-ID`` and carried by every log line written while it is served;
* its server span, when tracing is on (app/serving/tracing.py), continuing the client's
  ``traceparent``; the skins and the Service add its children;
* its metrics: counted by route (a bounded label from the route table, or the Open Inference
  Protocol's route template, which its skin leaves in the scope's state as ``route``) and
  status, refusals included;
* its access line (``IMGREC_ACCESS_LOG``): route, status and duration, as fields of the JSON
  log (app/serve/logs.py).

The gRPC skin does the same per call with ``start``, ``finish_span`` and ``access_line``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import route_table
from app.serving.metrics import Metrics
from app.serving.request_context import CURRENT, RequestContext, request_id
from app.serving.tracing import Tracing

access_log = logging.getLogger("imgrec.access")
_ID_HEADER = b"x-request-id"
_PROPAGATION = frozenset((b"traceparent", b"tracestate", b"baggage"))
_PROPAGATION_TEXT = frozenset(name.decode() for name in _PROPAGATION)


def start(tracing: Tracing, sent_id: str | None, name: str,
          carrier: Iterable[tuple[str, str]], attributes: dict[str, Any]) -> RequestContext:
    """A request's context: its id and, when tracing is on, its server span (the trace the
    carrier's ``traceparent`` names, continued)."""
    rid = request_id(sent_id)
    if not tracing.on:
        return RequestContext(rid)
    propagation = {k: v for k, v in carrier if k in _PROPAGATION_TEXT}
    return RequestContext(rid, tracing.server_span(name, propagation, {
        **attributes, "imgrec.request_id": rid}))


def finish_span(context: RequestContext, name: str, error: str | None,
                attributes: Mapping[str, Any]) -> None:
    """End the server span with its final name (once the route is known) and outcome."""
    span = context.span
    if span is None:
        return
    from opentelemetry.trace import StatusCode

    if span.is_recording():
        span.update_name(name)
        span.set_attributes(attributes)
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(StatusCode.ERROR)
    span.end()


def access_line(method: str, path: str, route: str, status: int | str, seconds: float) -> None:
    """One line per request, its fields for the JSON log (app/serve/logs.py)."""
    ms = seconds * 1000.0
    access_log.info("%s %s %s %.2f ms", method, path, status, ms,
                    extra={"route": route, "status": status, "duration_ms": round(ms, 3),
                           "method": method, "path": path})


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, tracing: Tracing,
                 access_log: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        method = scope["method"]
        # a state dict of this request's own (some servers share one between requests): the
        # skins write the route and the images answered into it
        scope["state"] = dict(scope.get("state") or {})
        headers = scope["headers"]
        sent = next((v.decode("latin-1") for k, v in headers if k == _ID_HEADER), None)
        context = start(self.tracing, sent, method,
                        ((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
                         if k in _PROPAGATION) if self.tracing.on else (),
                        {"http.request.method": method, "url.path": path,
                         "url.scheme": scope.get("scheme", "http")})
        token = CURRENT.set(context)
        id_header = (_ID_HEADER, context.request_id.encode())
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            failed = True  # the context stays set: the server's traceback line carries it
            raise
        finally:
            self._finish(scope, context, method, path, status, time.perf_counter() - started)
            if not failed:
                CURRENT.reset(token)

    def _finish(self, scope: Scope, context: RequestContext, method: str, path: str,
                status: int, seconds: float) -> None:
        state: Any = scope.get("state") or {}
        named = state.get("route") if isinstance(state, dict) else None
        template = named or route_table.label(path)
        route = f"{method} {template}"
        m = self.metrics
        m.requests.labels(route, str(status)).inc()
        m.latency.labels(route).observe(seconds)
        images = state.get("images") if isinstance(state, dict) else None
        if images:
            m.images.labels(route).inc(images)
        finish_span(context, route, str(status) if status >= 500 else None,
                    {"http.route": template, "http.response.status_code": status})
        if self.access_log:
            access_line(method, path, template, status, seconds)
