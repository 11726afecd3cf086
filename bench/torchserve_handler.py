"""TorchServe handler for an imgrec model directory (used by bench/torchserve_compare.py).

Runs imgrec's own code on imgrec's model directory, so only the serving stack differs from
`imgrec serve`: header check + decode + resize (`app.serving.upload_checks.prepare`), then one
`app.serving.predictor.Predictor.forward` per TorchServe batch (the model from
`app.nn.load_model_dir`, no pickle; BNs folded; per-batch normalisation; channels_last;
inference mode; one torch thread), and top-5 labels per request as imgrec's /predict ranks them.

The .mar carries card.json, weights.safetensors and imgrec_handler.json (the imgrec checkout to
import `app` from, and the pixel limit); TorchServe extracts them into the model directory.
Each request's multipart part named `file` arrives as data[i]["file"]; a raw body arrives as
"body" (or "data"), and both are accepted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

TOP_K = 5
INPUT_KEYS = ("file", "data", "body")


class ImgrecHandler:
    def __init__(self) -> None:
        self.initialized = False

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        config = json.loads((model_dir / "imgrec_handler.json").read_text())
        if config["root"] not in sys.path:
            sys.path.insert(0, config["root"])
        from app.serving.predictor import Predictor
        from app.serving.upload_checks import prepare

        self.prepare = prepare
        self.max_pixels = int(config["max_pixels"])
        # imgrec's own Predictor: app.nn.load_model_dir (card + safetensors, no pickle), BNs
        # folded, channels_last, per-batch normalisation, inference mode, one thread; no
        # embedding store (imgrec's server also writes every embedding to SQLite). The engine is
        # eager PyTorch by default, as TorchServe handlers run a model; the comparison can also
        # give it imgrec's ONNX Runtime engine to compare the serving stacks alone.
        self.predictor = Predictor(model_dir, device="cpu", dtype="float32", threads=1,
                                   engine=str(config.get("engine", "torch")))
        self.card = self.predictor.card
        self.labels = list(self.card.labels)
        self.predictor.warm_up(int(config.get("warmup_batches", 2)),
                               int(config.get("max_batch_size", 32)))
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        answers: list[Any] = [None] * len(data)
        images: list[bytes] = []
        slots: list[int] = []
        for i, row in enumerate(data):
            raw = next((row[k] for k in INPUT_KEYS if row.get(k) is not None), None)
            if raw is None:
                answers[i] = {"error": f"no image: send a multipart part named 'file' "
                                       f"(got {sorted(row)})"}
                continue
            if isinstance(raw, str):
                raw = raw.encode("latin-1")
            try:
                images.append(self.prepare(bytes(raw), self.card.input, self.max_pixels))
                slots.append(i)
            except ValueError as e:  # app.serving.upload_checks.ImageError is a ValueError
                answers[i] = {"error": str(e)}
        if images:
            for slot, result in zip(slots, self.predictor.forward(images), strict=True):
                probs = result.probs
                order = np.argsort(-probs, kind="stable")[:TOP_K]
                answers[slot] = {"labels": [{"label": self.labels[j], "index": int(j),
                                             "score": float(probs[j])} for j in order]}
        return answers


_service = ImgrecHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point; called with data=None once to initialise."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
