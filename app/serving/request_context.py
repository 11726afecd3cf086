"""Who is asking: the request id and trace span of the request being served, for the logs and
the trace of everything done on its behalf.

The skins set ``CURRENT`` when a request begins (HTTP in app/api/request_middleware.py, gRPC in
app/api/oip/grpc_server.py); every log line written in that request's task carries its id
(app/serve/logs.py reads it), and the Service makes its child spans under its span.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import Span

HEADER = "X-Request-ID"
# A client's id is kept when it is 1-128 of these characters (a UUID, a ULID, a load balancer's
# hex id, "svc.client-42_7"); anything else (empty, longer, spaces, quotes, control characters:
# what could forge a log line or a header) is replaced by an id of our own.
_WELL_FORMED = re.compile(r"[A-Za-z0-9._-]{1,128}")


def well_formed(value: str | None) -> bool:
    return value is not None and _WELL_FORMED.fullmatch(value) is not None


def request_id(sent: str | None) -> str:
    """The client's id if well formed, else a new one (32 hex digits, random; 4x cheaper than
    uuid4().hex, measured with timeit)."""
    return sent if sent is not None and well_formed(sent) else os.urandom(16).hex()


@dataclass(slots=True)
class RequestContext:
    request_id: str
    span: Span | None = None  # the server span, while tracing is on (app/serving/tracing.py)

    @property
    def trace_id(self) -> str | None:
        """The trace's id as W3C writes it (32 hex digits), None without a span."""
        if self.span is None:
            return None
        context = self.span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None


CURRENT: ContextVar[RequestContext | None] = ContextVar("imgrec_request", default=None)
