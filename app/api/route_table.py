"""Every HTTP route of the JSON skin and the page, written once.

The metrics labels, the paths open without an API key, the routes whose answers say whether
their vectors were stored, and the routes the fast path serves are all read from ``ROUTES``;
a route added here gets all four right at once. (The Open Inference Protocol's routes under
``/v2`` are their own skin: app/api/oip/rest.py labels and guards them.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    open: bool = False  # served without an API key (liveness, metrics, the card, docs, page)
    stores: bool = False  # stores the uploads' vectors: answers carry X-Imgrec-Stored
    fast: bool = False  # served by the fast path (app/api/fastpath.py), outside FastAPI


ROUTES: tuple[Route, ...] = (
    Route("POST", "/predict", stores=True, fast=True),
    Route("POST", "/embed", stores=True, fast=True),
    Route("GET", "/embed"),
    Route("POST", "/search", stores=True),
    Route("GET", "/search"),
    Route("GET", "/model", open=True),
    Route("GET", "/healthz", open=True),
    Route("GET", "/readyz", open=True),
    Route("GET", "/metrics", open=True),
    Route("GET", "/", open=True),
    Route("GET", "/model/files", open=True),
    Route("GET", "/docs", open=True),
    Route("GET", "/docs/oauth2-redirect", open=True),
    Route("GET", "/redoc", open=True),
    Route("GET", "/openapi.json", open=True),
    Route("GET", "/favicon.ico", open=True),
)
# Served for GET and HEAD under these prefixes, open, with a bounded label each: the page's
# static assets and the model card's files (plots).
OPEN_GET_PREFIXES = {"/static/": "/static/{name}", "/model/files/": "/model/files/{name}"}

PATHS = frozenset(r.path for r in ROUTES)
OPEN_PATHS = frozenset(r.path for r in ROUTES if r.open)
STORING = frozenset((r.method, r.path) for r in ROUTES if r.stores)
FAST = frozenset((r.method, r.path) for r in ROUTES if r.fast)


def is_open(method: str, path: str) -> bool:
    """Served without an API key. Everything else needs one, so that a route added later is
    protected unless the table says otherwise."""
    if path in OPEN_PATHS:
        return True
    return method in ("GET", "HEAD") and path.startswith(tuple(OPEN_GET_PREFIXES))


def label(path: str) -> str:
    """The route's metrics label: its path, a template for the prefixes, else ``other`` (a
    bounded set whatever clients send)."""
    if path in PATHS:
        return path
    for prefix, template in OPEN_GET_PREFIXES.items():
        if path.startswith(prefix):
            return template
    return "other"
