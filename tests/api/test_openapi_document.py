"""The OpenAPI document's facts that schemathesis found wrong, each pinned (fast; the full
conformance run is tests/api/test_openapi_conformance.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from helpers.apps import running
from helpers.images import png_bytes
from helpers.settings import make_settings

from app.api.openapi import image_media_types, media_type_formats
from app.main import create_app
from app.serving.upload_checks import ALLOWED_FORMATS

# one app for the module: its tests and its fixture share the module's event loop
pytestmark = pytest.mark.asyncio(loop_scope="module")
Client = httpx.AsyncClient


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[Client]:
    s = make_settings(served_model_dir, tmp_path_factory.mktemp("doc"), max_files=7)
    async with running(create_app(s)) as c:
        yield c


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    out: Any = doc
    for key in ref.removeprefix("#/").split("/"):
        out = out[key]
    return resolve(doc, out)


async def test_uploads_are_required_images_within_max_files(client: Client) -> None:
    doc = (await client.get("/openapi.json")).json()
    assert set(media_type_formats().values()) == ALLOWED_FORMATS
    for path in ("/predict", "/embed"):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        form = body["content"]["multipart/form-data"]
        schema = resolve(doc, form["schema"])
        assert schema["required"] == ["file"]
        assert (schema["properties"]["file"]["minItems"],
                schema["properties"]["file"]["maxItems"]) == (1, 7)
        types = [t.strip() for t in form["encoding"]["file"]["contentType"].split(",")]
        assert types == image_media_types() and "image/png" in types and "image/jpeg" in types


async def test_every_error_status_has_the_error_body(client: Client) -> None:
    doc = (await client.get("/openapi.json")).json()
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert set(resolve(doc, error["properties"]["error"])["required"]) == {"code", "message"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            statuses = set(op["responses"])
            assert "200" in statuses, (method, path)
            for status, response in op["responses"].items():
                content = response.get("content", {})
                assert content, (method, path, status)
                if status.startswith(("4", "5")):  # the Error component, or the same inline
                    body = resolve(doc, content["application/json"]["schema"])
                    assert body["required"] == ["error"], (method, path, status)
                    detail = resolve(doc, body["properties"]["error"])
                    assert set(detail["required"]) == {"code", "message"}, (method, path, status)
                if status == "503":
                    assert "Retry-After" in response["headers"]
    predict = doc["paths"]["/predict"]["post"]["responses"]
    assert {"400", "413", "415", "422", "503", "504"} <= set(predict)


async def test_top_k_bounded_by_the_models_classes(client: Client) -> None:
    doc = (await client.get("/openapi.json")).json()
    top_k = next(p for p in doc["paths"]["/predict"]["post"]["parameters"]
                 if p["name"] == "top_k")
    assert (top_k["schema"]["minimum"], top_k["schema"]["maximum"]) == (1, 10)
    png = [("file", ("a.png", png_bytes(0)))]
    assert (await client.post("/predict?top_k=10", files=png)).status_code == 200
    for bad in ("11", "0", "", "1_0", " 5", "\u0665", "5.0"):
        r = await client.post("/predict", params={"top_k": bad}, files=png)
        assert r.status_code == 422, bad


async def test_metrics_is_prometheus_text(client: Client) -> None:
    doc = (await client.get("/openapi.json")).json()
    documented = set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"])
    r = await client.get("/metrics")
    assert documented == {r.headers["content-type"]} == {"text/plain; version=0.0.4; charset=utf-8"}


async def test_allow_names_every_method_of_the_path(client: Client) -> None:
    for method, path, allow in (("OPTIONS", "/embed", "GET, POST"), ("PUT", "/embed", "GET, POST"),
                                ("GET", "/predict", "POST"), ("DELETE", "/healthz", "GET")):
        r = await client.request(method, path)
        assert (r.status_code, r.headers["allow"]) == (405, allow), (method, path)
        assert r.json()["error"]["code"] == "method_not_allowed"


async def test_embed_lookup_bounds(client: Client) -> None:
    doc = (await client.get("/openapi.json")).json()
    param = next(p for p in doc["paths"]["/embed"]["get"]["parameters"] if p["name"] == "id")
    assert param["required"] is True
    assert (param["schema"]["minItems"], param["schema"]["maxItems"]) == (1, 100)
    assert param["schema"]["items"]["pattern"] == "^[0-9a-fA-F]{64}$"
    assert (await client.get("/embed", params={"id": ["A" * 64] * 100})).status_code == 404
    assert (await client.get("/embed", params={"id": ["a" * 64] * 101})).status_code == 422
    assert (await client.get("/embed", params={"id": ""})).status_code == 422
