"""The unknown-picture scores of a calibrated model directory, compared: Mahalanobis (served),
the energy score and the maximum softmax probability, each as AUROC and FPR at 95% TPR of the
test split (known) against the far-OOD pictures (app/training/ood_sets.py); and whether the
float32 and int8 graphs call the same test and far-OOD images unknown. Prints figures, asserts
nothing.

    python bench/ood.py [--model-dir models/fashion-mnist]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.model.decode import load_input  # noqa: E402
from app.model.directory import calibration_tensors, open_model_dir  # noqa: E402
from app.serving.engines import OnnxRuntimeEngine  # noqa: E402
from app.serving.scores import Scores  # noqa: E402
from app.training import calibration_fit as fit  # noqa: E402
from app.training.data import load_data  # noqa: E402
from app.training.ood_sets import far_ood  # noqa: E402


def run(engine: OnnxRuntimeEngine, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    parts = [engine(images[i:i + 256]) for i in range(0, len(images), 256)]
    return (np.concatenate([p.logits for p in parts]),
            np.concatenate([p.features for p in parts]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=str(ROOT / "models" / "fashion-mnist"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    root, card = open_model_dir(args.model_dir)
    tensors = calibration_tensors(root, card)
    assert tensors is not None and card.calibration is not None, "calibrate the directory first"
    scores = Scores(card, tensors)
    test = np.asarray(load_data("fashion-mnist", None, 1).test.images.numpy(), np.uint8)
    far_files = [f for files in far_ood().values() for f in files]
    far = np.stack([load_input(f, card.input) for f in far_files])
    t = card.calibration.temperature
    print(f"# python bench/ood.py --model-dir {args.model_dir}")
    print(f"# known: {len(test)} test images; unknown: {len(far)} far-OOD pictures")
    print("| score | AUROC | FPR at 95% TPR |")
    print("|---|---|---|")
    f32 = OnnxRuntimeEngine(root / "model.onnx", args.threads)
    (lt, ft), (lf, ff) = run(f32, test), run(f32, far)
    assert scores.scorer is not None
    for name, known, unknown in (
            ("Mahalanobis (served)", scores.scorer(ft), scores.scorer(ff)),
            ("energy (T=1)", fit.energy(lt), fit.energy(lf)),
            (f"energy (T={t:.2f})", fit.energy(lt, t), fit.energy(lf, t)),
            ("max softmax probability", fit.msp(lt), fit.msp(lf))):
        print(f"| {name} | {fit.auroc(known, unknown):.4f} | "
              f"{fit.fpr_at_tpr(known, unknown):.4f} |")
    if "int8" in card.graphs:
        i8 = OnnxRuntimeEngine(root / card.graphs["int8"].file, args.threads)
        threshold = scores.threshold
        assert threshold is not None
        print("\n| images | unknown, float32 | unknown, int8 | same decision |")
        print("|---|---|---|---|")
        for name, images, feats in (("test", test, ft), ("far-OOD", far, ff)):
            a = scores.scorer(feats) > threshold
            b = scores.scorer(run(i8, images)[1]) > threshold
            print(f"| {name} ({len(images)}) | {a.mean():.4f} | {b.mean():.4f} | "
                  f"{(a == b).mean():.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
