"""``imgrec calibrate MODEL_DIR``: fit the temperature, the unknown-picture statistics and
threshold, measure them, and write them into the card (and MODEL_CARD.md, with a plot).

What is fitted on what (the trainer's own split, from the card's seed and val_fraction):
* class means and the shared covariance of the embedding: a seeded sample of the training
  split (not augmented), as Lee et al. do;
* the temperature (least NLL) and the threshold (the operating point: ``--known-fraction`` of
  the validation images called known): the validation split, which neither training nor the
  statistics saw;
* measured on the test split and on pictures made here (app/training/ood_sets.py): ECE before
  and after, the fraction of test images called unknown, far-OOD pictures called unknown, and
  where the class map's peak falls for garments pasted into one quadrant of a black canvas.

Everything runs the directory's float32 ONNX graph (outputs logits, embedding, cam), so the
figures are the CPU server's.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.model import tensorfile
from app.model.calibration import CALIBRATION_FILE, CalibrationSpec, OodSpec, softmax
from app.model.cam import input_map, total_stride
from app.model.card import ModelCard
from app.model.decode import load_input
from app.model.directory import (
    ModelDirError,
    atomic_write_bytes,
    graph_path,
    open_model_dir,
    read_card,
)
from app.nn.checkpoint import update_card
from app.training import calibration_fit as fit
from app.training.data import load_data, split_holdout
from app.training.ood_sets import far_ood, peak_quadrant, quadrant_canvases
from app.training.quantize_cli import split_arrays

DEFAULT_FIT_IMAGES = 20_000


class Graph:
    """The float32 graph's outputs for uint8 arrays, in batches."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        names = [o.name for o in self.session.get_outputs()]
        if names[:3] != ["logits", "embedding", "cam"]:
            raise ModelDirError(f"{path}: outputs {names} lack the class maps; export it again "
                                "first (imgrec export DIR)")

    def __call__(self, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, ...]:
        parts = [self.session.run(None, {"images": images[i:i + batch]})
                 for i in range(0, len(images), batch)]
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def _inputs(files: list[bytes], card: ModelCard) -> np.ndarray:
    return np.stack([load_input(f, card.input) for f in files])


def load_splits(card: ModelCard, data: str | None, fit_images: int, seed: int
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(uint8 images, labels) of the fit sample, the validation split and the test split."""
    config = card.training.get("config", {})
    bundle = load_data(data or str(config.get("data", "fashion-mnist")), None,
                       card.input.channels)
    if bundle.labels != card.labels:
        raise ModelDirError(f"data labels {bundle.labels} differ from the card's {card.labels}")
    train, val = split_holdout(bundle.train, float(config.get("val_fraction", 1 / 12)),
                               int(config.get("seed", 0)))
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    train = train.subset(pick[:fit_images])
    out = {}
    for name, split in (("fit", train), ("val", val), ("test", bundle.test)):
        images = split_arrays(split, card.input)
        if images.shape[-1] != card.input.size:  # IDX arrays at another size: as served
            from app.model.decode import array_to_input

            images = np.stack([array_to_input(im, card.input) for im in images])
        out[name] = (images, split.labels.numpy())
    return out


def localisation(graph: Graph, card: ModelCard, images: np.ndarray, labels: np.ndarray,
                 baseline: np.ndarray | None) -> dict[str, Any]:
    """How often the top label's map (and the true class's) peaks in the garment's quadrant."""
    files, quadrants = quadrant_canvases(images)
    logits, _, cam = graph(_inputs(files, card))
    stride, size = total_stride(card.arch), card.input.size
    top = logits.argmax(axis=1)
    hits = {"top": 0, "true": 0, "top_mass": 0}
    half = size // 2
    for i, q in enumerate(quadrants):
        for key, label in (("top", int(top[i])), ("true", int(labels[i]))):
            m = input_map(cam[i], label, size, stride, baseline)
            hits[key] += peak_quadrant(m) == q
            if key == "top":
                mass = [m[r:r + half, c:c + half].sum() for r in (0, half) for c in (0, half)]
                hits["top_mass"] += int(np.argmax(mass)) == q
    n = len(files)
    return {"images": n, "canvas": "each test garment in one quadrant of a black canvas twice "
            "its side", "peak_in_quadrant_top_label": round(hits["top"] / n, 4),
            "peak_in_quadrant_true_label": round(hits["true"] / n, 4),
            "most_mass_in_quadrant_top_label": round(hits["top_mass"] / n, 4),
            "top1_on_canvas": round(float((top == labels).mean()), 4)}


def calibrate(root: Path, card: ModelCard, splits: dict[str, tuple[np.ndarray, np.ndarray]],
              known_fraction: float, threads: int, cam_baseline: bool, measure: bool = True
              ) -> tuple[CalibrationSpec, dict[str, np.ndarray], dict[str, Any]]:
    """The fitted calibration, its tensors, and the arrays the plot draws; ``measure=False``
    leaves out the far-OOD and localisation figures (and the plot)."""
    path = graph_path(root, card, "float32")
    if path is None:
        raise ModelDirError(f"{root}: no model.onnx; imgrec export {root} first")
    graph = Graph(path, threads)
    _, fit_f, _ = graph(splits["fit"][0])
    means, precision = fit.fit_gaussian(fit_f, splits["fit"][1], card.num_classes)
    val_logits, val_f, _ = graph(splits["val"][0])
    temperature = fit.fit_temperature(val_logits, splits["val"][1])
    val_scores = fit.mahalanobis(val_f, means, precision)
    tensors = {"class_means": means, "precision": precision}
    blank = np.zeros((1, card.input.channels, card.input.size, card.input.size), np.uint8)
    if cam_baseline:
        tensors["cam_baseline"] = graph(blank)[2][0]
    test_images, test_labels = splits["test"]
    test_logits, test_f, _ = graph(test_images)
    test_scores = fit.mahalanobis(test_f, means, precision)
    quantiles = fit.quantile_table(val_scores)
    ood = OodSpec(sha256="0" * 64, known_fraction=known_fraction, threshold=0.0,
                  quantiles=quantiles)
    threshold = ood.threshold_at(known_fraction)
    before, after = softmax(test_logits), softmax(test_logits, temperature)
    metrics: dict[str, Any] = {
        "fit_images": len(fit_f), "val_images": len(val_f), "test_images": len(test_f),
        "temperature": round(temperature, 4),
        "test_ece_before": round(fit.ece(before, test_labels), 4),
        "test_ece_after": round(fit.ece(after, test_labels), 4),
        "val_nll_before": round(fit.nll(val_logits, splits["val"][1], 1.0), 4),
        "val_nll_after": round(fit.nll(val_logits, splits["val"][1], temperature), 4),
        "test_top1": round(float((after.argmax(1) == test_labels).mean() * 100), 2),
        "test_top1_unchanged": bool((after.argmax(1) == before.argmax(1)).all()),
        "test_unknown_fraction": round(float((test_scores > threshold).mean()), 4),
    }
    data = {"val": val_scores, "test": test_scores, "before": before, "after": after,
            "labels": test_labels}
    if measure:
        far = {kind: fit.mahalanobis(graph(_inputs(files, card))[1], means, precision)
               for kind, files in far_ood().items()}
        metrics.update({
            "far_ood_unknown_fraction": round(float(
                np.mean(np.concatenate([s > threshold for s in far.values()]))), 4),
            "far_ood_images": sum(len(s) for s in far.values()),
            "far_ood_by_kind": {k: round(float((s > threshold).mean()), 4)
                                for k, s in far.items()},
            "localisation": localisation(graph, card, test_images[:2000], test_labels[:2000],
                                         tensors.get("cam_baseline"))})
        data["far"] = np.concatenate(list(far.values()))
    spec = CalibrationSpec(
        weights_sha256=card.weights_sha256, temperature=temperature,
        ood=ood.model_copy(update={"threshold": threshold, "fit": {
            "split": "train (seeded sample, not augmented)", "images": len(fit_f),
            "shrinkage": fit.SHRINKAGE, "threshold_split": "val"}}),
        cam={"stride": total_stride(card.arch), "baseline": "blank" if cam_baseline else None},
        metrics=metrics, created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    return spec, tensors, data


def write(root: Path, card: ModelCard, spec: CalibrationSpec, tensors: dict[str, np.ndarray],
          data: dict[str, np.ndarray]) -> None:
    blob = tensorfile.encode(tensors, {"what": "imgrec calibrate: class means and precision of "
                                       "the embedding; the blank picture's class maps"})
    atomic_write_bytes(root / CALIBRATION_FILE, blob)
    import hashlib

    ood = spec.ood.model_copy(update={"sha256": hashlib.sha256(blob).hexdigest()})
    spec = spec.model_copy(update={"ood": ood})
    if "far" in data:  # measured: the plot of it
        from app.training.calibration_plot import plot_calibration

        plot_calibration(root / "calibration.png", spec, data)
    update_card(root, card.model_copy(update={"calibration": spec}))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgrec calibrate",
        description="Fit calibrated scores (a temperature) and the unknown-picture score "
                    "(Mahalanobis distance of the embedding to the class means) of a model "
                    "directory, measure them, and record them in the card.")
    p.add_argument("model_dir")
    p.add_argument("--data", default=None, help="the card's training data unless given")
    p.add_argument("--known-fraction", type=float, default=0.95,
                   help="operating point: fraction of validation images called known")
    p.add_argument("--fit-images", type=int, default=DEFAULT_FIT_IMAGES,
                   help="training images the class statistics are fitted on")
    p.add_argument("--no-cam-baseline", action="store_true",
                   help="draw the raw class map, without subtracting a blank picture's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    return p


def calibrate_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root, card = open_model_dir(args.model_dir)
    splits = load_splits(card, args.data, args.fit_images, args.seed)
    spec, tensors, data = calibrate(root, card, splits, args.known_fraction, args.threads,
                                    not args.no_cam_baseline)
    command = "imgrec calibrate " + shlex.join(sys.argv[2:] if argv is None else argv)
    write(root, card, spec.model_copy(update={"command": command}), tensors, data)
    spec = read_card(root).calibration or spec
    m = spec.metrics
    print(f"calibrated {root}: T={spec.temperature:.3f}, ECE {m['test_ece_before']:.4f} -> "
          f"{m['test_ece_after']:.4f}; unknown: test {m['test_unknown_fraction']:.2%}, far-OOD "
          f"{m['far_ood_unknown_fraction']:.2%}; CAM peak in quadrant "
          f"{m['localisation']['peak_in_quadrant_top_label']:.2%}", file=sys.stderr)
    return 0
