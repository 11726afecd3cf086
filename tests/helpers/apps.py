"""Helpers for tests that drive the app in process: a client with the lifespan running, uploads
of the conftest images, and Prometheus text read back."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from conftest import png_bytes
from fastapi import FastAPI

from app.serving.service import Service


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app, with its lifespan (model load, warm-up, batcher) running."""
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=30) as c:
            yield c


def upload(*seeds: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart `file` parts of conftest's PNGs, one per seed."""
    return [("file", (f"{s}.png", png_bytes(s), "image/png")) for s in seeds]


def image_id(seed: int) -> str:
    """The id the service gives the PNG of this seed: the sha256 of its bytes."""
    return hashlib.sha256(png_bytes(seed)).hexdigest()


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Gate:
    """Blocks the inference thread until opened; counts the images that reached the network."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.open.set()
        self.images = 0
        original = Service._forward

        def gated(service: Service, items: list[Any]) -> Any:
            self.open.wait(20)
            self.images += len(items)
            return original(service, items)

        monkeypatch.setattr(Service, "_forward", gated)
