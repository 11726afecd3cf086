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
from app.nn.preprocess import normalize_batch
from app.serving.engines import build_engine
from app.serving.store import EmbeddingStore

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
    """Holds the model; ``run_batch`` is called on the batcher's single inference thread."""

    def __init__(self, model_dir: str | os.PathLike[str], device: str = "auto",
                 dtype: str = "auto", threads: int = 1,
                 store: EmbeddingStore | None = None, engine: str = "auto") -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        loaded: LoadedModel = load_model_dir(Path(model_dir))
        self.card = loaded.card
        self.model_key = loaded.card.weights_sha256
        # BNs that directly follow a conv are folded into it: same function, fewer passes
        model = fold_batchnorms(loaded.model.eval())
        self.engine = build_engine(engine, model, self.device, self.dtype, threads)
        self.store = store
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        log.info("loaded %s (%s, %d parameters) on %s as %s with %s", self.card.name,
                 self.card.preset, self.card.parameters, self.device, self.dtype,
                 self.engine.name)

    def warm_up(self, batches: int, batch_size: int) -> None:
        spec = self.card.input
        x = torch.zeros(spec.channels, spec.size, spec.size, dtype=torch.uint8)
        for n in {1, batch_size}:
            for _ in range(batches):
                self.forward([x] * n)

    @torch.inference_mode()
    def forward(self, images: Sequence[torch.Tensor]) -> list[Prediction]:
        # uint8 travels to the device; normalisation runs there, once per batch
        batch = torch.stack(list(images)).to(self.device, non_blocking=True)
        p, f = self.engine(normalize_batch(batch, self.card.input))
        return [Prediction(p[i], f[i]) for i in range(len(images))]

    def run_batch(self, items: list[tuple[str, torch.Tensor]]) -> list[Prediction]:
        """Forward pass, then keep every vector in the embedding store before answering."""
        results = self.forward([tensor for _, tensor in items])
        if self.store is not None:
            self.store.put_many(self.model_key, [(image_id, r.embedding)
                                                 for (image_id, _), r in zip(items, results,
                                                                             strict=True)])
        return results
