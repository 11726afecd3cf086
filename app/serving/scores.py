"""From the engine's outputs to what an answer says: calibrated probabilities, the
out-of-distribution score and the unknown decision, and the top label's class map. numpy only,
the same for every engine and precision.

A card without calibration (older directories) serves as before: softmax of the raw logits,
``ood_score`` and ``unknown`` None, and ``/model`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.model.calibration import OodScorer, softmax
from app.model.card import ModelCard
from app.serving.engines import Outputs

UNCALIBRATED = ("this model's card has no calibration: scores are the raw softmax, and no "
                "image is called unknown (imgrec calibrate DIR fits both)")


@dataclass(slots=True)
class Prediction:
    probs: np.ndarray  # (num_classes,) float32, calibrated when the card is
    embedding: np.ndarray  # (embedding_dim,) float32
    ood_score: float | None = None  # higher = less like the training data
    unknown: bool | None = None  # ood_score above the operating point's threshold
    cam: np.ndarray | None = None  # (h, w) cell map of the top label, less the blank's


class Scores:
    def __init__(self, card: ModelCard, tensors: dict[str, np.ndarray] | None,
                 known_fraction: float | None = None) -> None:
        self.calibration = card.calibration if tensors is not None else None
        cal = self.calibration
        self.temperature = cal.temperature if cal is not None else 1.0
        self.scorer = OodScorer.from_tensors(tensors) if tensors is not None else None
        self.baseline = tensors.get("cam_baseline") if tensors is not None else None
        self.known_fraction: float | None = None
        self.threshold: float | None = None
        if cal is not None:
            self.known_fraction = known_fraction or cal.ood.known_fraction
            self.threshold = (cal.ood.threshold_at(known_fraction) if known_fraction
                              else cal.ood.threshold)
        elif known_fraction:
            raise ValueError(f"IMGREC_OOD_KNOWN_FRACTION={known_fraction}, but {UNCALIBRATED}")

    def __call__(self, out: Outputs) -> list[Prediction]:
        probs = softmax(out.logits, self.temperature)
        n = len(probs)
        ood: list[float | None] = [None] * n
        unknown: list[bool | None] = [None] * n
        if self.scorer is not None and self.threshold is not None:
            scores = self.scorer(out.features)
            ood = scores.tolist()
            unknown = (scores > self.threshold).tolist()
        cams: list[np.ndarray | None] = [None] * n
        if out.cam is not None:
            top = out.logits.argmax(axis=1)
            cells = out.cam[np.arange(n), top]
            if self.baseline is not None:
                cells = cells - self.baseline[top]
            cams = list(cells)
        return [Prediction(probs[i], out.features[i], ood[i], unknown[i], cams[i])
                for i in range(n)]

    def describe(self) -> dict[str, Any]:
        """``/model``'s ``calibration``: what the scores mean here."""
        cal = self.calibration
        if cal is None:
            return {"calibrated": False, "message": UNCALIBRATED}
        return {
            "calibrated": True, "temperature": cal.temperature, "method": cal.ood.method,
            "threshold": self.threshold, "known_fraction": self.known_fraction,
            "card_known_fraction": cal.ood.known_fraction,
            "card_threshold": cal.ood.threshold,
            "metrics": cal.metrics,
            "message": f"ood_score above {self.threshold:.6g} is unknown: that calls "
                       f"{self.known_fraction:.2%} of the validation images known",
        }
