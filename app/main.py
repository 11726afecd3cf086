"""create_app() + lifespan: wiring only. Load the model, warm up, start and stop the batcher."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI

from app import __version__
from app.api import web
from app.api.auth import ApiKeyMiddleware, KeyRing
from app.api.errors import install_error_handlers
from app.api.fastpath import FastPathMiddleware
from app.api.oip.rest import OipMiddleware
from app.api.openapi import install_openapi
from app.api.request_middleware import RequestMiddleware
from app.api.routes import router
from app.api.search import router as search_router
from app.serving.metrics import Metrics
from app.serving.service import Service
from app.serving.tracing import Tracing, describe
from app.settings import Settings

log = logging.getLogger("imgrec.main")


@contextmanager
def _sighup_reloads(reloads: list[tuple[str, Callable[[], object]]]) -> Iterator[None]:
    """SIGHUP, the signal operators send to reload, is handled while the block runs: its default
    action would end the process. Each (what, reload) pair runs on a worker thread, in order;
    with none, one log line says there is nothing to reload. Without a main-thread loop (an app
    driven by a test client) there is no signal to watch."""
    loop = asyncio.get_running_loop()

    def reload_all() -> None:
        for _, reload in reloads:
            reload()

    def on_sighup() -> None:
        what = ", ".join(name for name, _ in reloads)
        log.info("SIGHUP: reloading %s", what or "nothing (no API keys file is configured)")
        if reloads:
            loop.run_in_executor(None, reload_all)

    before = signal.getsignal(signal.SIGHUP)  # imgrec serve ignores it until now (serve/cli.py)
    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    except (RuntimeError, ValueError, NotImplementedError):
        log.debug("no SIGHUP handler here (not the main thread)")
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)  # which sets the default action: ending
        if before is not None:
            signal.signal(signal.SIGHUP, before)


def _on_loop(reload: Callable[[str], Coroutine[object, object, str]], trigger: str
             ) -> Callable[[], str]:
    """A coroutine of the Service as a call _sighup_reloads can make from its worker thread."""
    loop = asyncio.get_running_loop()
    return lambda: asyncio.run_coroutine_threadsafe(reload(trigger), loop).result()


@asynccontextmanager
async def _grpc_skin(service: Service, keys: KeyRing | None) -> AsyncIterator[None]:
    """The Open Inference Protocol over gRPC while the block runs; with IMGREC_GRPC_PORT=0,
    grpcio and tritonclient are not even imported."""
    if service.settings.grpc_port == 0:
        yield
        return
    from app.api.oip.grpc_server import start_grpc, stop_grpc

    server = await start_grpc(service, keys)
    try:
        yield
    finally:
        await stop_grpc(server, service.settings.graceful_shutdown_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    # OpenTelemetry's own OTEL_* variables, nothing of ours: off without an exporter
    # (app/serving/tracing.py); a configuration it cannot honour stops the start-up here
    tracing = Tracing.from_env()
    # a keys file that does not load stops the start-up here (KeyFileError names the line)
    keys = KeyRing(settings.api_keys_file) if settings.api_keys_file is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(settings, metrics, tracing=tracing)
        app.state.service = service
        log.info("%s", describe(os.environ))
        # SIGHUP re-reads the keys (when there are keys) and loads the model directory anew
        # (switching only to one that loads, with no request lost), from the start-up on
        reloads: list[tuple[str, Callable[[], object]]] = (
            [("API keys", keys.reload)] if keys is not None else [])
        reloads.append(("the model", _on_loop(service.reload_model, "SIGHUP")))
        with _sighup_reloads(reloads):
            await service.start()
            # Start-up leaves millions of long-lived objects (the model, ONNX Runtime, imported
            # libraries); without this every full collection walks them all and stalls the
            # event loop for 100+ ms (seen as p99 = 10x p50). Freezing moves them out of its view.
            gc.collect()
            gc.freeze()
            try:
                # the gRPC skin starts once the Service is ready and stops before it
                async with _grpc_skin(service, keys):
                    yield
            finally:
                await service.stop()
                await asyncio.to_thread(tracing.shutdown)  # what is buffered goes out

    app = FastAPI(
        title="imgrec",
        version=__version__,
        summary="Image recognition with the patent's residual network: labels and feature "
                "vectors as JSON.",
        lifespan=lifespan,
        # FastAPI's built-in OpenTelemetry hook would trace only the routes FastAPI serves
        # (not the fast path nor the OIP skins) and ask for a tracer provider on every request:
        # RequestMiddleware traces them all instead (ignored by older FastAPI)
        telemetry={"tracing": False, "metrics": False},
    )
    app.state.settings = settings
    app.state.api_keys = keys  # also for other protocols' servers (gRPC metadata)
    app.include_router(router)
    app.include_router(web.router)  # the page at /, its assets, the model card's plots
    app.include_router(search_router)
    install_error_handlers(app)
    install_openapi(app)  # the document with the running limits (tested by schemathesis)
    # measured: 1.1k -> 1.4k req/s at concurrency 64, 1.09 -> 0.89 ms CPU per request
    app.add_middleware(FastPathMiddleware)  # inside the metrics middleware (added after it)
    if keys is not None:  # outside the fast path, so that it covers every route
        app.add_middleware(ApiKeyMiddleware, keys=keys, metrics=metrics)
    # the Open Inference Protocol's REST routes (/v2/...), outside FastAPI's routing and
    # schema: the protocol has its own specification (app/api/oip/rest.py says why); it checks
    # API keys itself, answering in the protocol's terms
    app.add_middleware(OipMiddleware, keys=keys)
    # outermost: every route, the fast path and the OIP get a request id, span and metrics
    app.add_middleware(RequestMiddleware, metrics=metrics, tracing=tracing,
                       access_log=settings.access_log)
    logging.getLogger("imgrec").setLevel(settings.log_level.upper())
    return app
