"""imgrec's app under a real uvicorn on a thread of its own, HTTP and gRPC ports both open: what
tests that talk to it through tritonclient (the Open Inference Protocol) and perf_analyzer
need."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import uvicorn

from app.main import create_app
from app.serving.service import Service
from app.settings import Settings
from helpers.daemons import LOOPBACK, free_port, wait_until


class LiveServer:
    """create_app() under a real uvicorn on a thread of its own: HTTP and gRPC ports."""

    def __init__(self, model_dir: Path, tmp_path: Path, **kw: Any) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        # the torch engine: no ONNX export at each start (the protocol is under test here)
        base: dict[str, Any] = {"model_dir": model_dir, "device": "cpu", "warmup_batches": 1,
                                "engine": "torch", "embed_store": str(tmp_path / "emb.sqlite3"),
                                "host": LOOPBACK, "port": self.port, "grpc_port": self.grpc_port}
        base.update(kw)
        self.app = create_app(Settings(**base))
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
