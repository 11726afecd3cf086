"""The process's log: imgrec's lines and uvicorn's own, through one handler on stderr, as text
or (``IMGREC_LOG_FORMAT=json``) one JSON object per line.

Every line written while a request is served carries its request id and trace id
(app/serving/request_context.py): in JSON as ``request_id`` and ``trace_id`` (null outside a
request, or with tracing off), in text as a ``[request_id=... trace_id=...]`` suffix. A JSON
line's keys: ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``,
``request_id``, ``trace_id``, ``exception`` (the traceback) when there is one, and for access
lines (``imgrec.access``) ``method``, ``path``, ``route``, ``status``, ``duration_ms``. Nothing
else of a record is written: no headers, no arguments a library attached, so no secret can
ride along.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from app.serving.request_context import CURRENT

ACCESS_FIELDS = ("method", "path", "route", "status", "duration_ms")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RequestFilter(logging.Filter):
    """Stamps each record with the request being served where it was written (the handler
    runs in the writer's thread and task, so the context is the writer's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = CURRENT.get()
        record.request_id = context.request_id if context is not None else None
        record.trace_id = context.trace_id if context is not None else None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "trace_id": getattr(record, "trace_id", None),
        }
        for field in ACCESS_FIELDS:
            if field in record.__dict__:
                line[field] = record.__dict__[field]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid is None:
            return text
        trace = getattr(record, "trace_id", None)
        suffix = f" [request_id={rid}" + (f" trace_id={trace}]" if trace else "]")
        head, newline, rest = text.partition("\n")  # after the message, before a traceback
        return head + suffix + newline + rest


def handler(log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    out = logging.StreamHandler(stream or sys.stderr)
    out.addFilter(RequestFilter())
    out.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return out


def configure_logging(level: str, log_format: str, stream: IO[str] | None = None) -> None:
    """One handler on the root logger; uvicorn's loggers (run with ``log_config=None``) and
    imgrec's propagate to it."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(log_format, stream))
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
