"""Request metrics as a plain ASGI middleware (BaseHTTPMiddleware costs far more per request).

Every request is counted by route (a bounded label from the route table, or the Open Inference
Protocol's route template, which its skin leaves in the scope's state as ``route``) and
status, refusals included."""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import route_table
from app.serving.metrics import Metrics


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        method = scope["method"]
        # a state dict of this request's own (some servers share one between requests): the
        # skins write the route and the images answered into it
        scope["state"] = dict(scope.get("state") or {})
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state: Any = scope.get("state") or {}
            named = state.get("route") if isinstance(state, dict) else None
            route = f"{method} {named or route_table.label(path)}"
            m = self.metrics
            m.requests.labels(route, str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - started)
            images = state.get("images") if isinstance(state, dict) else None
            if images:
                m.images.labels(route).inc(images)
