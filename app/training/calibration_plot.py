"""calibration.png: the reliability of the top-1 score before and after the temperature, and
the unknown score of validation, test and far-OOD pictures against the threshold."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
import numpy as np

from app.model.calibration import CalibrationSpec


def _reliability(ax: plt.Axes, probs: np.ndarray, labels: np.ndarray, name: str) -> None:
    conf, right = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, 16)
    mids, accs = [], []
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.sum() >= 5:
            mids.append(conf[inside].mean())
            accs.append(right[inside].mean())
    ax.plot(mids, accs, marker="o", label=name)


def plot_calibration(path: Path, spec: CalibrationSpec, data: dict[str, np.ndarray]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    m = spec.metrics
    _reliability(left, data["before"], data["labels"], f"raw softmax (ECE {m['test_ece_before']})")
    _reliability(left, data["after"], data["labels"],
                 f"T = {spec.temperature:.2f} (ECE {m['test_ece_after']})")
    left.set(xlabel="top-1 score", ylabel="accuracy", title="Calibration (test split)")
    left.legend(loc="upper left")
    top = max(float(np.quantile(data["far"], 0.99)), spec.ood.threshold * 3)
    bins = np.geomspace(max(float(min(data["val"].min(), data["far"].min())), 1.0), top, 60)
    for name, key in (("validation", "val"), ("test", "test"), ("far-OOD pictures", "far")):
        right.hist(np.clip(data[key], bins[0], bins[-1]), bins=bins, density=True, alpha=0.5,
                   label=name)
    right.axvline(spec.ood.threshold, color="black", linestyle="--",
                  label=f"threshold ({spec.ood.known_fraction:.0%} of validation known)")
    right.set(xscale="log", xlabel="ood_score (Mahalanobis)", ylabel="density",
              title="Unknown pictures")
    right.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
