"""TorchServe handler with Pillow preprocessing, as a TorchServe user writes one (bench/photos.py).

What TorchServe's own vision handlers do with an upload: ``Image.open`` on the bytes, then the
model's transforms on the decoded image; here EXIF orientation (``ImageOps.exif_transpose``),
conversion to the card's colour mode and an antialiased bilinear resize to the input size, with
Pillow. The network is imgrec's own Predictor (card + safetensors through app.nn, no pickle,
eager PyTorch, one thread per worker), so the model and its cost are the same as imgrec's; only
the decoding and the serving stack differ. Top-5 labels per request, as imgrec's /predict ranks.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

TOP_K = 5
INPUT_KEYS = ("file", "data", "body")


class PillowHandler:
    def __init__(self) -> None:
        self.initialized = False

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        config = json.loads((model_dir / "imgrec_handler.json").read_text())
        if config["root"] not in sys.path:
            sys.path.insert(0, config["root"])
        from app.serving.predictor import Predictor

        self.predictor = Predictor(model_dir, device="cpu", dtype="float32", threads=1,
                                   engine=str(config.get("engine", "torch")))
        self.spec = self.predictor.card.input
        self.labels = list(self.predictor.card.labels)
        self.predictor.warm_up(2, 32)
        self.initialized = True

    def prepare(self, raw: bytes) -> bytes:
        from PIL import Image, ImageOps

        size, channels = self.spec.size, self.spec.channels
        with Image.open(io.BytesIO(raw)) as im:
            upright = ImageOps.exif_transpose(im)
            img = upright.convert("L" if channels == 1 else "RGB")
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(img)
        return (arr if channels == 1 else arr.transpose(2, 0, 1)).tobytes()

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        answers: list[Any] = [None] * len(data)
        images: list[bytes] = []
        slots: list[int] = []
        for i, row in enumerate(data):
            raw = next((row[k] for k in INPUT_KEYS if row.get(k) is not None), None)
            if raw is None:
                answers[i] = {"error": "no image: send a multipart part named 'file'"}
                continue
            if isinstance(raw, str):
                raw = raw.encode("latin-1")
            try:
                images.append(self.prepare(bytes(raw)))
                slots.append(i)
            except (OSError, ValueError) as e:
                answers[i] = {"error": str(e)}
        if images:
            for slot, result in zip(slots, self.predictor.forward(images), strict=True):
                order = np.argsort(-result.probs, kind="stable")[:TOP_K]
                answers[slot] = {"labels": [{"label": self.labels[j], "index": int(j),
                                             "score": float(result.probs[j])} for j in order]}
        return answers


_service = PillowHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point; called with data=None once to initialise."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
