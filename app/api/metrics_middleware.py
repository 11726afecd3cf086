"""Request metrics as a plain ASGI middleware (BaseHTTPMiddleware costs far more per request)."""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.oip import rest as oip
from app.serving.metrics import Metrics

ROUTES = {"/predict", "/embed", "/model", "/healthz", "/readyz", "/metrics"}


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        label = (path if path in ROUTES
                 else oip.route_template(path) if oip.handles(path) else "other")
        route = f"{scope['method']} {label}"
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
            m = self.metrics
            m.requests.labels(route, str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - started)
            state: Any = scope.get("state") or {}
            images = state.get("images") if isinstance(state, dict) else None
            if images:
                m.images.labels(route).inc(images)
