"""TorchServe handler for an imgrec model directory (used by bench/torchserve_compare.py).

Loads the network with imgrec's own loader (card.json + safetensors, no pickle) and prepares
uploads with imgrec's own code, so only the serving stack differs from `imgrec serve`:
header check + decode + preprocess (`app.serving.images.prepare`), one forward pass per
TorchServe batch in inference mode on one torch thread, channels_last, softmax, top-5 labels.

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

import torch

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
        from app.nn import load_model_dir
        from app.serving.images import prepare

        torch.set_num_threads(1)
        self.prepare = prepare
        self.max_pixels = int(config["max_pixels"])
        loaded = load_model_dir(model_dir)
        self.card = loaded.card
        self.labels = list(loaded.card.labels)
        self.model = loaded.model.to(memory_format=torch.channels_last).eval()
        spec = self.card.input
        x = torch.zeros(spec.channels, spec.size, spec.size)
        for n in (1, 32):  # the same warm-up as imgrec's (2 passes at 1 and at max batch)
            for _ in range(2):
                self.forward([x] * n)
        self.initialized = True

    @torch.inference_mode()
    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(images).contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.model(x).float(), dim=1)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        answers: list[Any] = [None] * len(data)
        images: list[torch.Tensor] = []
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
            except ValueError as e:  # app.serving.images.ImageError is a ValueError
                answers[i] = {"error": str(e)}
        if images:
            probs = self.forward(images)
            scores, order = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
            for slot, s_row, o_row in zip(slots, scores.tolist(), order.tolist(), strict=True):
                answers[slot] = {"labels": [{"label": self.labels[j], "index": j, "score": s}
                                            for s, j in zip(s_row, o_row, strict=True)]}
        return answers


_service = ImgrecHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point; called with data=None once to initialise."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
