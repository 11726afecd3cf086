"""What the API keys and the store's outages add to the OpenAPI document, in one place.

Applied on top of whatever builds the document (it wraps ``app.openapi``), so the routes'
own descriptions stay where they are:

* with API keys configured: the bearer security scheme, and on every route the key middleware
  protects (the same ``is_open`` test decides both) its `security` and its 401 answer;
* `X-Imgrec-Stored` on the 200 answers of the routes that store vectors;
* GET /embed's 503 while the store is down.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.api.auth import is_open
from app.api.routes import STORED_HEADER

SCHEME = "apiKey"
ERROR_BODY: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}
UNAUTHORIZED: dict[str, Any] = {
    "description": "no API key, or not a valid one (`Authorization: Bearer <key>`)",
    "headers": {"WWW-Authenticate": {"description": "`Bearer realm=\"imgrec\"`, with "
                                     "`error=\"invalid_token\"` for a wrong key",
                                     "schema": {"type": "string"}}},
    "content": {"application/json": {"schema": ERROR_BODY}},
}
STORED: dict[str, Any] = {
    "description": "`true` when every vector of the answer is in the embedding store, "
                   "`false` during a store outage (the answer itself is complete)",
    "schema": {"type": "string", "enum": ["true", "false"]},
}
STORE_DOWN: dict[str, Any] = {
    "description": "the embedding store is unavailable (Retry-After)",
    "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
    "content": {"application/json": {"schema": ERROR_BODY}},
}
STORING_ROUTES = (("post", "/predict"), ("post", "/embed"))
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def add_documentation(app: FastAPI, api_keys: bool) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        paths: dict[str, dict[str, Any]] = schema.get("paths", {})
        for method, path in STORING_ROUTES:
            op = paths.get(path, {}).get(method)
            if op is not None:
                ok = op.setdefault("responses", {}).setdefault("200", {"description": "OK"})
                ok.setdefault("headers", {})[STORED_HEADER] = STORED
        lookup = paths.get("/embed", {}).get("get")
        if lookup is not None:
            lookup.setdefault("responses", {}).setdefault("503", STORE_DOWN)
        if api_keys:
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes[SCHEME] = {"type": "http", "scheme": "bearer",
                               "description": "one of the keys in IMGREC_API_KEYS_FILE"}
            for path, item in paths.items():
                for method in METHODS:
                    op = item.get(method)
                    if op is None or is_open(method.upper(), path):
                        continue
                    op["security"] = [{SCHEME: []}]
                    op.setdefault("responses", {})["401"] = UNAUTHORIZED
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
