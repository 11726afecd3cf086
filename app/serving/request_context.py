"""Who is asking: the request id and trace span of the request being served, for the logs and
the trace of everything done on its behalf.

The skins set ``CURRENT`` when a request begins (HTTP in app/api/request_middleware.py, gRPC in
app/api/oip/grpc_server.py); every log line written in that request's task carries its id
(app/serve/logs.py reads it), and the Service makes its child spans under its span.
"""

from __future__ import annotations

import os
import random
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


# Request ids need to be unique, not secret: a generator seeded once from the OS. os.urandom
# per request is a system call that lets go of the GIL, and under load the event loop then
# waits up to a switch interval to get it back (py-spy put 10% of the loop's samples there).
_IDS = random.Random(os.urandom(32))


def request_id(sent: str | None) -> str:
    """The client's id if well formed, else a new one (32 hex digits, random)."""
    return sent if sent is not None and well_formed(sent) else f"{_IDS.getrandbits(128):032x}"


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
