"""The open-set protocol: train with two Fashion-MNIST classes held out, then ask each unknown
score to tell the held-out classes' test images (unknown) from the others' (known). AUROC and
FPR at 95% TPR for Mahalanobis (what is served), the energy score and the maximum softmax
probability baseline. Prints figures, asserts nothing.

The short CPU run: ``--epochs`` epochs of the ``fashion`` preset on ``--limit-train`` training
images of the eight known classes, through the trainer's own API (app.training.train.train),
whose network keeps its ten outputs (the two held-out ones are never a target).

    python bench/open_set.py --hold-out 8,9 --epochs 3 --limit-train 20000
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.model.directory import read_card  # noqa: E402
from app.serving.engines import OnnxRuntimeEngine  # noqa: E402
from app.training import calibration_fit as fit  # noqa: E402
from app.training.config import TrainConfig  # noqa: E402
from app.training.data import find_fashion_mnist, read_idx  # noqa: E402
from app.training.train import train  # noqa: E402


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                      *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def outputs(model_dir: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    engine = OnnxRuntimeEngine(model_dir / "model.onnx", 2)
    parts = [engine(images[i:i + 256]) for i in range(0, len(images), 256)]
    return (np.concatenate([p.logits for p in parts]),
            np.concatenate([p.features for p in parts]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hold-out", default="8,9", help="class indices kept out of training")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit-train", type=int, default=20000)
    p.add_argument("--fit-images", type=int, default=10000)
    args = p.parse_args()
    held = [int(c) for c in args.hold_out.split(",")]
    src = find_fashion_mnist()
    raw = {s: read_idx(next(src.glob(f"{s}*"))) for s in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    known_train = ~np.isin(raw["train-labels-idx1-ubyte"], held)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        data.mkdir()
        write_idx(data / "train-images-idx3-ubyte", raw["train-images-idx3-ubyte"][known_train])
        write_idx(data / "train-labels-idx1-ubyte", raw["train-labels-idx1-ubyte"][known_train])
        write_idx(data / "t10k-images-idx3-ubyte", raw["t10k-images-idx3-ubyte"])
        write_idx(data / "t10k-labels-idx1-ubyte", raw["t10k-labels-idx1-ubyte"])
        cfg = TrainConfig(data=str(data), preset="fashion", epochs=args.epochs,
                          limit_train=args.limit_train, out=str(tmp / "model"), threads=2,
                          workers=1, progress=False, warmup_epochs=0.5)
        started = time.perf_counter()
        out = train(cfg)
        wall = time.perf_counter() - started
        card = read_card(out)
        train_x = raw["train-images-idx3-ubyte"][known_train][:args.fit_images][:, None]
        train_y = raw["train-labels-idx1-ubyte"][known_train][:args.fit_images].astype(int)
        test_x = raw["t10k-images-idx3-ubyte"][:, None]
        test_y = raw["t10k-labels-idx1-ubyte"].astype(int)
        _, ftrain = outputs(out, train_x)
        logits, ftest = outputs(out, test_x)
    present = sorted(set(train_y.tolist()))
    means, precision = fit.fit_gaussian(ftrain, np.searchsorted(present, train_y),
                                        len(present))
    unknown = np.isin(test_y, held)
    known_top1 = float((logits[~unknown].argmax(1) == test_y[~unknown]).mean() * 100)
    print(f"# python bench/open_set.py {' '.join(sys.argv[1:])}")
    print(f"# held out: {[card.labels[c] for c in held]}; trained {wall:.0f} s "
          f"({args.epochs} epochs, {args.limit_train} images); known-class test top-1 "
          f"{known_top1:.2f}%; {int((~unknown).sum())} known and {int(unknown.sum())} "
          "held-out test images")
    print("| score | AUROC | FPR at 95% TPR |")
    print("|---|---|---|")
    rows = {}
    for name, s in (("Mahalanobis (served)", fit.mahalanobis(ftest, means, precision)),
                    ("energy", fit.energy(logits)),
                    ("max softmax probability (baseline)", fit.msp(logits))):
        rows[name] = {"auroc": round(fit.auroc(s[~unknown], s[unknown]), 4),
                      "fpr_at_95_tpr": round(fit.fpr_at_tpr(s[~unknown], s[unknown]), 4)}
        print(f"| {name} | {rows[name]['auroc']:.4f} | {rows[name]['fpr_at_95_tpr']:.4f} |")
    print(json.dumps({"held_out": [card.labels[c] for c in held], "epochs": args.epochs,
                      "train_images": args.limit_train, "wall_s": round(wall),
                      "known_top1": round(known_top1, 2), "scores": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
