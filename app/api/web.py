"""The browser page at / and the model card's plots: each served from a fixed allow-list.

No part of a client's path reaches the filesystem: a request names a key of ASSETS or
CARD_FILES, and the file read is the one that key maps to (anything else is a JSON 404).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from starlette.responses import FileResponse

from app.api.errors import ApiError, JSONBytes
from app.api.openapi import errors

router = APIRouter()
WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# name under /static/ -> media type; the page itself is served at /
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
# the plots the trainer writes into a model directory (app/training/train.py) -> their title
CARD_FILES = {"curves.png": "Training curves", "confusion.png": "Confusion matrix (test set)",
              "calibration.png": "Calibration and unknown pictures"}

# The page loads nothing from elsewhere, and the browser is told to refuse anything else too:
# scripts and styles from these files only, images from here or the page's own blob: previews.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # revalidate every time (cheap: ETag), so a new release's page is never mixed with old JS
    "Cache-Control": "no-cache",
}
NOT_FOUND_DOC = errors({
    404: "not an allow-listed name, or the model directory lacks that file"})


class CardFile(BaseModel):
    name: str = Field(description="one of: " + ", ".join(CARD_FILES))
    title: str
    url: str = Field(description="where GET serves it (image/png)")


class CardFiles(BaseModel):
    files: list[CardFile] = Field(description="the plots the served model directory has")


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def _asset(name: str, media_type: str) -> Asset:
    # read once, on first request (a few kB each); a packaging error fails loudly here
    body = (WEB_DIR / name).read_bytes()
    return Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def _serve(request: Request, asset: Asset) -> Response:
    headers = {**PAGE_HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


# The page and its scripts are not part of the JSON API: kept out of the OpenAPI schema.
@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def page(request: Request) -> Response:
    return _serve(request, _asset("index.html", "text/html; charset=utf-8"))


@router.get("/static/{name}", include_in_schema=False)
async def web_asset(request: Request, name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no such page asset: {name[:100]}")
    return _serve(request, _asset(name, media_type))


def _model_dir(request: Request) -> Path:
    model_dir: Path = request.app.state.settings.model_dir
    return model_dir


@router.get("/model/files", response_model=CardFiles,
            summary="The model card's plots that the served model directory has")
async def card_files(request: Request) -> JSONBytes:
    model_dir = _model_dir(request)
    return JSONBytes({"files": [
        {"name": name, "title": title, "url": f"/model/files/{name}"}
        for name, title in CARD_FILES.items() if (model_dir / name).is_file()]})


@router.get("/model/files/{name}", response_class=Response,
            summary="One of the model card's plots (curves.png or confusion.png)",
            responses={200: {"content": {"image/png": {"schema": {"type": "string",
                                                                   "format": "binary"}}},
                             "description": "the PNG file"}, **NOT_FOUND_DOC})
async def card_file(request: Request, name: str) -> Response:
    if name not in CARD_FILES:
        raise ApiError(404, "not_found", f"no such model file: {name[:100]} (served: "
                       f"{', '.join(CARD_FILES)})")
    path = _model_dir(request) / name  # name is one of CARD_FILES' plain file names
    if not path.is_file():
        raise ApiError(404, "not_found", f"the model directory has no {path.name}")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})
