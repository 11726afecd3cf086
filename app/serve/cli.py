"""`imgrec serve`: one uvicorn worker, one model copy, settings from IMGREC_* and flags."""

from __future__ import annotations

import logging
import os
import signal
import sys

import uvicorn

from app.serve.file_limit import apply_file_plan
from app.serve.http_server import ConnectionLimits, DrainingServer, ImgrecHttpProtocol
from app.serve.logs import configure_logging
from app.serve.refusals import (
    CANNOT_SERVE,
    OneLineParser,
    Refusal,
    check_api_keys,
    check_model_dir,
    check_tracing,
    read_settings,
)
from app.settings import Settings

# The listen backlog; at shutdown the server accepts what is in it (http_server), so it is part
# of the open files kept free beside the connection cap (file_limit).
BACKLOG = 2048


def serve_main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; a refusal at start-up is one line on stderr (refusals.py
    says which exit status means what)."""
    # SIGHUP's default action ends the process. Until the app handles it (app/main.py, from
    # the start of its lifespan) and after, it is ignored: the start-up loads the model
    # directory as it is then anyway, and a process on its way out has nothing to reload.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        settings = _checked_settings(argv)
    except Refusal as e:
        print(f"imgrec serve: {e}", file=sys.stderr)
        return e.status
    configure_logging(settings.log_level, settings.log_format)
    # glibc malloc tuning measured 1.8-2.5x faster CPU inference; it must be set before the
    # process starts, so we only warn here (the Dockerfile and compose set it).
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        logging.getLogger("imgrec").info(
            "tip: MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=134217728 speed up "
            "CPU inference")
    server = _server(settings)
    server.run()
    if server.startup_failure is not None:
        print(f"imgrec serve: start-up failed: {server.startup_failure}", file=sys.stderr)
        return CANNOT_SERVE
    return 0


def _checked_settings(argv: list[str] | None) -> Settings:
    """The settings, once they parse and the files they name can be served (else Refusal)."""
    p = OneLineParser(prog="imgrec serve", description="Serve a model directory over HTTP. "
                      "Every setting is also an IMGREC_* environment variable.")
    p.add_argument("--host", help="bind address (IMGREC_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="bind port (IMGREC_PORT, default 8000)")
    p.add_argument("--model-dir", help="model directory (IMGREC_MODEL_DIR)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (IMGREC_DEVICE)")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    flags = {k: "--" + k.replace("_", "-") for k in overrides}  # to name them in a refusal
    settings = read_settings(overrides, flags)
    check_api_keys(settings.api_keys_file)
    check_tracing(os.environ)
    check_model_dir(settings.model_dir, flags)
    return settings


def _server(settings: Settings) -> DrainingServer:
    from app.main import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, workers=1,
        # uvicorn's lines go to the handler configure_logging set (text or JSON, with the
        # request id); the access line is imgrec's own (app/api/request_middleware.py), with
        # the route and duration uvicorn's lacks
        log_config=None, log_level=settings.log_level, access_log=False, lifespan="on",
        loop="uvloop", http=ImgrecHttpProtocol, ws="none", backlog=BACKLOG,
        proxy_headers=False,  # client addresses are never used; one middleware less per request
    )
    plan = apply_file_plan(settings.max_connections, BACKLOG)
    limits = ConnectionLimits(settings.header_timeout_s, settings.body_timeout_s,
                              plan.max_connections, settings.retry_after_s)

    def begin_drain() -> None:  # SIGTERM/SIGINT: readiness 503 at once
        service = getattr(app.state, "service", None)
        if service is not None:
            service.begin_drain()

    return DrainingServer(config, limits, settings.drain_delay_s, settings.graceful_shutdown_s,
                          begin_drain)
