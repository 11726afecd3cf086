"""The network on its device: load from a model directory, warm up, run batches."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.nn.checkpoint import LoadedModel, load_model_dir
from app.nn.fuse import fold_batchnorms
from app.serving.engines import build_engine

log = logging.getLogger("imgrec.predictor")


@dataclass(slots=True)
class Prediction:
    probs: np.ndarray  # (num_classes,) float32
    embedding: np.ndarray  # (embedding_dim,) float32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"IMGREC_DEVICE={name} but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class Predictor:
    """Holds the model; ``forward`` is called on the batcher's single inference thread."""

    def __init__(self, model_dir: str | os.PathLike[str], device: str = "auto",
                 dtype: str = "auto", threads: int = 1, engine: str = "auto") -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        loaded: LoadedModel = load_model_dir(Path(model_dir))
        self.card = loaded.card
        self.model_key = loaded.card.weights_sha256
        # BNs that directly follow a conv are folded into it: same function, fewer passes
        model = fold_batchnorms(loaded.model.eval())
        self.engine = build_engine(engine, model, self.card.input, self.device, self.dtype,
                                   threads)
        spec = self.card.input
        self.image_shape = (spec.channels, spec.size, spec.size)
        self.image_bytes = spec.channels * spec.size * spec.size
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        log.info("loaded %s (%s, %d parameters) on %s as %s with %s", self.card.name,
                 self.card.preset, self.card.parameters, self.device, self.dtype,
                 self.engine.name)

    def warm_up(self, batches: int, batch_size: int) -> None:
        blank = bytes(self.image_bytes)
        for n in {1, batch_size}:
            for _ in range(batches):
                self.forward([blank] * n)

    def forward(self, images: Sequence[bytes]) -> list[Prediction]:
        """Images as ``app.serving.images.prepare`` gives them (uint8 (C, size, size) bytes).

        Joining bytes and viewing them as an array hold the GIL throughout; the engine call is
        the only place the thread lets go of it, so the event loop cannot make it wait more than
        once per batch."""
        for image in images:
            if len(image) != self.image_bytes:
                raise ValueError(f"an image of {len(image)} bytes; this model takes "
                                 f"{self.image_bytes} ({self.image_shape} uint8)")
        pixels = np.frombuffer(bytearray().join(images), np.uint8)  # writable: torch wants it
        batch = pixels.reshape(len(images), *self.image_shape)
        p, f = self.engine(batch)
        return [Prediction(p[i], f[i]) for i in range(len(images))]
