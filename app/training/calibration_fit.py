"""The statistics behind calibrated scores and the unknown decision, fitted with numpy, and the
measures they are judged by (ECE, AUROC, FPR at 95% TPR)."""

from __future__ import annotations

import itertools

import numpy as np

from app.model.calibration import KNOWN_FRACTIONS, OodScorer, softmax

SHRINKAGE = 0.01  # of the covariance towards its mean variance: a 512-d estimate stays invertible


def fit_gaussian(features: np.ndarray, labels: np.ndarray, classes: int,
                 shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the precision of one covariance shared by all classes (Lee et al.)."""
    f = features.astype(np.float64)
    means = np.stack([f[labels == c].mean(axis=0) for c in range(classes)])
    centred = f - means[labels]
    cov = centred.T @ centred / len(f)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2  # exactly symmetric for the Cholesky factor
    return means.astype(np.float32), precision.astype(np.float32)


def mahalanobis(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    return OodScorer(means, precision)(features)


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Liu et al.'s energy, -T logsumexp(logits / T): higher = less like the training data."""
    z = logits.astype(np.float64) / temperature
    top = z.max(axis=1)
    return -(temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1))))


def msp(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The maximum softmax probability baseline, negated so that higher = less known."""
    return -softmax(logits.astype(np.float32), temperature).max(axis=1)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits.astype(np.float32), temperature)
    return float(-np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-12)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature of least validation NLL (golden-section search on log T)."""
    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, labels, np.exp(a)), nll(logits, labels, np.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, labels, np.exp(b))
    return float(np.exp((lo + hi) / 2))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 score, equal-width bins (Guo et al.)."""
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(right[inside].mean() - conf[inside].mean())
    return float(total)


def quantile_table(scores: np.ndarray) -> list[float]:
    return [float(v) for v in np.quantile(scores.astype(np.float64), KNOWN_FRACTIONS)]


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Probability that an unknown image scores above a known one (ties count half)."""
    s = np.concatenate([known, unknown]).astype(np.float64)
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for value in np.unique(s[np.diff(np.sort(s), prepend=np.nan) == 0]):  # average tied ranks
        tied = s == value
        ranks[tied] = ranks[tied].mean()
    u = ranks[len(known):].sum() - len(unknown) * (len(unknown) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of unknown images called known at the threshold that keeps ``tpr`` of the
    known ones known (the usual FPR@95%TPR, known images being the positives)."""
    threshold = np.quantile(known, tpr)
    return float((unknown <= threshold).mean())
