"""Driving the app from a test: in process with its lifespan running (`running`, the one way), or
under a real uvicorn for clients that need sockets (`LiveServer`); uploads of the test images,
Prometheus text read back, and a gate that holds the inference thread."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.main import create_app
from app.serving.service import Service
from helpers.daemons import LOOPBACK, free_port, wait_until
from helpers.images import png_bytes
from helpers.settings import make_settings


@asynccontextmanager
async def running(app: FastAPI, lifespan: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app, with its lifespan (model load, warm-up, batcher) running;
    with ``lifespan=False`` the routes alone, before any start-up."""
    if not lifespan:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test", timeout=30) as c:
            yield c
        return
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=30) as c:
            yield c


class LiveServer:
    """create_app() under a real uvicorn on a thread of its own, HTTP and gRPC on free loopback
    ports: for clients that need a socket (tritonclient's HTTP and gRPC clients). Settings as
    make_settings() makes them; ``grpc_port=0`` turns gRPC off."""

    def __init__(self, model_dir: Path, tmp_path: Path, **overrides: Any) -> None:
        values: dict[str, Any] = {"host": LOOPBACK, "port": free_port(),
                                  "grpc_port": free_port(), **overrides}
        settings = make_settings(model_dir, tmp_path, **values)
        self.port, self.grpc_port = settings.port, settings.grpc_port
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=LOOPBACK, port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"{LOOPBACK}:{self.port}"
        self.grpc_url = f"{LOOPBACK}:{self.grpc_port}"

    @property
    def service(self) -> Service:
        service: Service = self.app.state.service
        return service

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 90, "the server to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not stop"


def upload(*seeds: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart `file` parts of helpers.images' PNGs, one per seed."""
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
    """Holds the inference thread at the network (Service._forward) while closed.

    ``reached`` is set when a batch arrives at the gate, ``held`` is the number of its images
    waiting there, and ``images`` counts the images that went through to the network; so a test
    waits for the state it needs instead of sleeping. (The warm-up does not pass the gate.)"""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.open.set()
        self.reached = threading.Event()
        self.held = 0
        self.images = 0
        lock = threading.Lock()
        original = Service._forward

        def gated(service: Service, items: list[Any]) -> Any:
            with lock:
                self.held += len(items)
            self.reached.set()
            self.open.wait(20)
            with lock:
                self.held -= len(items)
                self.images += len(items)
            return original(service, items)

        monkeypatch.setattr(Service, "_forward", gated)

    def close(self) -> None:
        """Hold the next batch that reaches the network (and forget any earlier one)."""
        self.reached.clear()
        self.open.clear()
