"""The OpenAPI document's shared pieces, so that every route describes what it really does.

CI runs schemathesis with all its checks against ``/openapi.json`` of a live server
(tests/api/test_openapi_conformance.py): every status a route can answer, the body and content type
of each, every parameter's bounds and the request body's media types have to be in here. Routes
of any protocol reuse these pieces:

- ``Error`` / ``errors(...)``: the JSON error body ``{"error": {"code", "message"}}`` as one
  named component schema, and the ``responses=`` entries for a route's error statuses (503
  and 429 also document ``Retry-After``).
- ``image_upload_body()``: ``openapi_extra`` for a multipart body of one or more ``file``
  parts, each an image in one of ``ALLOWED_FORMATS`` (its media types are derived from that
  set, so a format added there is documented here); the part count is bounded by
  ``IMGREC_MAX_FILES`` through the ``ImageUploads`` component filled in by
  ``install_openapi``.
- ``install_openapi(app)``: builds the document once the model is loaded, with the bounds that
  come from the running configuration (``max_files``, ``top_k`` up to the model's classes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from app.api.deps import STORED_HEADER
from app.api.route_table import STORING, is_open
from app.serving.upload_checks import ALLOWED_FORMATS

# PIL's format names -> the registered media types (PIL.Image.MIME knows most, but only after
# every plugin was imported; these are the IANA names a client sends).
_MEDIA_TYPES = {
    "JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp",
    "GIF": "image/gif", "TIFF": "image/tiff", "AVIF": "image/avif", "HEIF": "image/heif",
    "HEIC": "image/heic", "JPEG2000": "image/jp2", "ICO": "image/x-icon",
}
UPLOADS_COMPONENT = "ImageUploads"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. unsupported_image")
    message: str = Field(description="what was wrong, for people")


class Error(BaseModel):
    """Every error answer: the status says the class, ``code`` the reason."""

    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "schema": {"type": "integer", "minimum": 0}}}


def errors(statuses: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for error statuses: ``{status: description}`` -> each documented
    with the ``Error`` JSON body (and ``Retry-After`` for 503 and 429)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status, description in statuses.items():
        entry: dict[str, Any] = {"description": description, "model": Error}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


UPLOAD_ERRORS = errors({
    400: "malformed multipart body, or no part named `file`",
    413: "body over IMGREC_MAX_UPLOAD_BYTES, more than IMGREC_MAX_FILES files, or an image over "
         "IMGREC_MAX_IMAGE_PIXELS",
    415: "a file is not an image in an allowed format, or cannot be decoded",
    422: "bad query parameters",
    500: "the forward pass failed (this request only; the service goes on)",
    503: "overloaded (queue full), warming up or shutting down",
    504: "the request's deadline (IMGREC_REQUEST_TIMEOUT_MS) passed while queued",
})
ERROR_REF = {"$ref": "#/components/schemas/Error"}
SECURITY_SCHEME = "apiKey"
UNAUTHORIZED: dict[str, Any] = {
    "description": "no API key, or not a valid one (`Authorization: Bearer <key>`)",
    "headers": {"WWW-Authenticate": {"description": "`Bearer realm=\"imgrec\"`, with "
                                     "`error=\"invalid_token\"` for a wrong key",
                                     "schema": {"type": "string"}}},
    "content": {"application/json": {"schema": ERROR_REF}},
}
STORED: dict[str, Any] = {
    "description": "`true` when every vector of the answer is in the embedding store, "
                   "`false` during a store outage (the answer itself is complete)",
    "schema": {"type": "string", "enum": ["true", "false"]},
}
STORE_DOWN: dict[str, Any] = {
    "description": "the embedding store is unavailable (Retry-After)",
    "headers": _RETRY_AFTER,
    "content": {"application/json": {"schema": ERROR_REF}},
}
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def image_media_types() -> list[str]:
    """The media types of ``ALLOWED_FORMATS``, sorted."""
    return sorted(media_type_formats())


def media_type_formats() -> dict[str, str]:
    """Media type -> PIL format name, for the formats in ``ALLOWED_FORMATS``."""
    return {_MEDIA_TYPES.get(f, f"image/{f.lower()}"): f for f in sorted(ALLOWED_FORMATS)}


def image_upload_body(description: str = "one or more images") -> dict[str, Any]:
    """``openapi_extra`` for a multipart body of one or more ``file`` image parts."""
    formats = ", ".join(sorted(ALLOWED_FORMATS))
    return {"requestBody": {
        "required": True,
        "description": f"{description} ({formats}), each a part named `file`; other parts are "
                       "ignored. The format is read from the bytes, not from the part's "
                       "Content-Type.",
        "content": {"multipart/form-data": {
            "schema": {"$ref": f"#/components/schemas/{UPLOADS_COMPONENT}"},
            "encoding": {"file": {"contentType": ", ".join(image_media_types())}},
        }},
    }}


def _uploads_schema(max_files: int) -> dict[str, Any]:
    return {
        "type": "object", "required": ["file"],
        "properties": {"file": {
            "type": "array", "minItems": 1, "maxItems": max_files,
            "items": {"type": "string", "format": "binary"},
            "description": f"the images, 1 to {max_files} (IMGREC_MAX_FILES) parts named "
                           "`file`",
        }},
    }


# (path, method, query parameter): its maximum is the loaded model's number of classes
LABEL_BOUNDED = [("/predict", "post", "top_k")]


def _build(app: FastAPI) -> tuple[dict[str, Any], bool]:
    doc = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                      summary=app.summary, description=app.description, routes=app.routes,
                      tags=app.openapi_tags, servers=app.servers)
    settings = app.state.settings
    doc.setdefault("components", {}).setdefault("schemas", {})[UPLOADS_COMPONENT] = \
        _uploads_schema(settings.max_files)
    service = getattr(app.state, "service", None)
    predictor = getattr(service, "predictor", None)
    complete = predictor is not None
    if predictor is not None:
        classes = len(predictor.card.labels)
        for path, method, name in LABEL_BOUNDED:
            op = doc["paths"].get(path, {}).get(method, {})
            for p in op.get("parameters", []):
                if p["name"] == name and p["in"] == "query":
                    p["schema"]["maximum"] = classes
                    p["description"] = f"{p.get('description', name)}; this model has " \
                                       f"{classes}"
    _validation_errors_are_errors(doc)
    _document_store(doc)
    if app.state.api_keys is not None:
        _document_keys(doc)
    return doc, complete


def _document_store(doc: dict[str, Any]) -> None:
    """`X-Imgrec-Stored` on the 200 answers of the routes that store vectors (the route
    table's), and GET /embed's 503 while the store is down."""
    paths: dict[str, dict[str, Any]] = doc.get("paths", {})
    for method, path in STORING:
        op = paths.get(path, {}).get(method.lower())
        if op is not None:
            ok = op.setdefault("responses", {}).setdefault("200", {"description": "OK"})
            ok.setdefault("headers", {})[STORED_HEADER] = STORED
    lookup = paths.get("/embed", {}).get("get")
    if lookup is not None:
        lookup.setdefault("responses", {}).setdefault("503", STORE_DOWN)


def _document_keys(doc: dict[str, Any]) -> None:
    """With API keys: the bearer scheme, and on every route the key middleware protects (the
    same ``is_open`` decides both) its `security` and its 401 answer."""
    schemes = doc.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[SECURITY_SCHEME] = {"type": "http", "scheme": "bearer",
                                "description": "one of the keys in IMGREC_API_KEYS_FILE"}
    for path, item in doc.get("paths", {}).items():
        for method in HTTP_METHODS:
            op = item.get(method)
            if op is None or is_open(method.upper(), path):
                continue
            op["security"] = [{SECURITY_SCHEME: []}]
            op.setdefault("responses", {})["401"] = UNAUTHORIZED


def _validation_errors_are_errors(doc: dict[str, Any]) -> None:
    """FastAPI documents a route's 422 as its own ``HTTPValidationError``; the app answers every
    validation error with the ``Error`` body (app/api/errors.py), so say that."""
    schemas = doc.get("components", {}).get("schemas", {})
    fastapi_ref = {"$ref": "#/components/schemas/HTTPValidationError"}
    for item in doc["paths"].values():
        for op in item.values():
            for status, response in op.get("responses", {}).items():
                if str(status) in ("429", "503"):  # every refusal of the app says when to retry
                    response.setdefault("headers", {}).setdefault("Retry-After",
                                                                  _RETRY_AFTER["Retry-After"])
                media = response.get("content", {}).get("application/json", {})
                if media.get("schema") == fastapi_ref:
                    media["schema"] = {"$ref": "#/components/schemas/Error"}
    if "Error" not in schemas:
        error = Error.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error.pop("$defs", {}))
        schemas["Error"] = error
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)


def install_openapi(app: FastAPI) -> None:
    """``app.openapi()`` from the routes plus the running configuration; cached once the model
    is loaded (before that, bounds taken from the model are left out), and built anew when a
    model update has replaced the model (its class count bounds top_k)."""
    built_for: list[int | None] = [None]  # the class count the cached document bounds

    def classes() -> int | None:
        predictor = getattr(getattr(app.state, "service", None), "predictor", None)
        return None if predictor is None else len(predictor.card.labels)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None and built_for[0] == classes():
            return app.openapi_schema
        doc, complete = _build(app)
        if complete:
            app.openapi_schema, built_for[0] = doc, classes()
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
