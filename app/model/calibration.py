"""What makes a model's answers honest, fitted once by ``imgrec calibrate`` and kept in the card:
a temperature for calibrated probabilities, and the statistics and threshold of the
out-of-distribution score that says "unknown".

torch-free, as the CPU server reads it: the card holds the small facts as JSON (``card.json``'s
``calibration``), the class means and the precision matrix of the penultimate features live in
``calibration.safetensors`` beside the weights, whose sha256 the card records and the server
checks (app.model.directory).

The score is the Mahalanobis distance to the nearest class mean with one shared covariance
(Lee et al., NeurIPS 2018) over the embedding the network already outputs: ``min_c (f - mu_c)^T
P (f - mu_c)``, higher = less like the training data. It was chosen by measurement against the
energy score and the maximum softmax probability (BENCHMARKS.md, "Unknown pictures").
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

CALIBRATION_FILE = "calibration.safetensors"
# the operating points the card can be moved to without refitting: the validation score below
# which that fraction of the validation images falls
KNOWN_FRACTIONS = [round(0.5 + 0.0025 * i, 4) for i in range(200)] + [0.999, 1.0]


class OodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["mahalanobis"] = "mahalanobis"
    file: str = Field(CALIBRATION_FILE, pattern=r"^[A-Za-z0-9._-]+\.safetensors$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    known_fraction: float = Field(gt=0, le=1, description="the operating point: the fraction "
                                  "of validation images called known")
    threshold: float = Field(description="ood_score above it = unknown")
    known_fractions: list[float] = Field(default_factory=lambda: list(KNOWN_FRACTIONS))
    quantiles: list[float] = Field(description="validation ood_score at each known_fractions")
    fit: dict[str, Any] = Field(default_factory=dict, description="what the statistics were "
                                "fitted on (split, images, shrinkage)")

    @model_validator(mode="after")
    def _table(self) -> OodSpec:
        if len(self.known_fractions) != len(self.quantiles) or len(self.quantiles) < 2:
            raise ValueError("known_fractions and quantiles need one value each, two or more")
        if any(b < a for a, b in zip(self.quantiles, self.quantiles[1:], strict=False)):
            raise ValueError("quantiles must not decrease")
        return self

    def threshold_at(self, known_fraction: float) -> float:
        """The threshold that calls ``known_fraction`` of the validation images known."""
        lo, hi = self.known_fractions[0], self.known_fractions[-1]
        if not lo <= known_fraction <= hi:
            raise ValueError(f"known fraction {known_fraction} is outside the card's table "
                             f"({lo} to {hi})")
        return float(np.interp(known_fraction, self.known_fractions, self.quantiles))


class CalibrationSpec(BaseModel):
    """card.json's ``calibration``: written by ``imgrec calibrate``; absent on older cards."""

    model_config = ConfigDict(extra="forbid")

    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the weights it was "
                                "fitted for")
    temperature: float = Field(gt=0, description="logits / T before the softmax")
    ood: OodSpec
    cam: dict[str, Any] = Field(default_factory=dict, description="how maps are drawn")
    metrics: dict[str, Any] = Field(default_factory=dict)
    command: str = ""
    created_at: str = ""


class OodScorer:
    """The Mahalanobis score from a (N, D) batch of embeddings, numpy only: the features are
    whitened once (f L, with P = L L^T) and compared with the whitened class means."""

    def __init__(self, means: np.ndarray, precision: np.ndarray) -> None:
        if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"class means {means.shape} and precision {precision.shape} "
                             "do not fit together")
        self.whiten = np.linalg.cholesky(precision.astype(np.float64)).astype(np.float32)
        self.means = (means.astype(np.float32) @ self.whiten)
        self.mean_norms = (self.means ** 2).sum(axis=1)

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> OodScorer:
        return cls(tensors["class_means"], tensors["precision"])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        z = features.astype(np.float32, copy=False) @ self.whiten
        d = (z ** 2).sum(axis=1, keepdims=True) - 2.0 * (z @ self.means.T) + self.mean_norms
        return np.maximum(d.min(axis=1), 0.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / np.float32(temperature) if temperature != 1.0 else logits.copy()
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z
