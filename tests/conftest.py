"""Shared fixtures: small random-weight model directories made in the test itself."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.model import InputSpec, ModelCard
from app.nn import create_model, save_model_dir

# The app serves gRPC on IMGREC_GRPC_PORT (default 8001): tests never listen on a fixed port,
# so every app and `imgrec serve` a test starts has gRPC off unless the test gives it a free port
# (tests/test_oip.py does).
os.environ.setdefault("IMGREC_GRPC_PORT", "0")

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def make_model_dir(path: Path, preset: str = "fashion-small", seed: int = 0,
                   labels: list[str] | None = None, version: str = "0") -> Path:
    torch.manual_seed(seed)
    labels = labels or LABELS
    model = create_model(preset, len(labels), zero_init_last=False)
    # random BN statistics so that outputs depend on every layer
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    c = model.config
    mean, std = ([0.286], [0.353]) if c.in_channels == 1 else ([0.485, 0.456, 0.406],
                                                               [0.229, 0.224, 0.225])
    card = ModelCard(name=f"test-{preset}", version=version, preset=preset, arch=c.to_dict(),
                     labels=labels, embedding_dim=model.embedding_dim,
                     input=InputSpec(size=c.input_size, channels=c.in_channels, mean=mean,
                                     std=std))
    save_model_dir(model, card, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight `fashion-small` model directory (10 Fashion-MNIST labels)."""
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny")


def png_bytes(seed: int, size: int = 28, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
