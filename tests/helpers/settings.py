"""The one way tests build the service's Settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.settings import Settings


def make_settings(model_dir: Path, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test app of the model directory: the CPU, one warm-up batch, an SQLite
    embedding store in tmp_path and gRPC off; any field given by keyword replaces its value.

    Fields not named here or in ``overrides`` come from the defaults and IMGREC_* variables, as
    in production (tests/conftest.py turns gRPC off for the processes tests start too)."""
    values: dict[str, Any] = {"model_dir": model_dir, "device": "cpu", "warmup_batches": 1,
                              "embed_store": str(tmp_path / "emb.sqlite3"), "grpc_port": 0}
    values.update(overrides)
    return Settings(**values)
