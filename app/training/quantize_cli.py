"""``imgrec quantize MODEL_DIR``: the int8 graph of a model directory, calibrated on its training
data and measured on its test split.

The trainer's side of quantisation: it loads the card's data set (``app.training.data``) as
uint8 arrays and hands them to ``app.nn.quantize``, which quantizes and measures arrays and
knows nothing of data sets. Image files are decoded by ``app.model.decode`` exactly as the
server prepares an upload (the same code), so calibration sees the pixels serving will see.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.model.card import InputSpec, ModelCard
from app.model.decode import DecodeError, load_input
from app.model.directory import ModelDirError, open_model_dir
from app.nn.quantize import DEFAULT_CALIBRATION_IMAGES, quantize_model_dir
from app.training.data import DataError, Split, load_data


def load_split_arrays(card: ModelCard, data: str | None, calibration_images: int,
                      test_limit: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Calibration images (a seeded random sample of the training split) and the test split,
    as uint8 arrays, from the card's training data unless ``data`` names other data."""
    spec = data or str(card.training.get("config", {}).get("data", "fashion-mnist"))
    bundle = load_data(spec, None, card.input.channels)
    if bundle.labels != card.labels:
        raise ModelDirError(f"data labels {bundle.labels} differ from the card's {card.labels}")
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(bundle.train), generator=generator)[:calibration_images]
    calibration = split_arrays(bundle.train.subset(pick), card.input)
    test = bundle.test
    if test_limit:
        test = test.subset(torch.arange(min(test_limit, len(test))))
    return calibration, split_arrays(test, card.input), test.labels.numpy(), bundle.source


def split_arrays(split: Split, spec: InputSpec) -> np.ndarray:
    """A split's images as uint8 (N, C, H, W): in-memory images as they are (``quantize_model_dir``
    brings them to the input size), image files decoded to the card's input."""
    if split.images is not None:
        return np.asarray(split.images.numpy(), dtype=np.uint8)
    return np.stack([prepared_file(p, spec) for p in split.paths])


def prepared_file(path: Path, spec: InputSpec) -> np.ndarray:
    """An image file -> uint8 (channels, size, size), the pixels the server computes for the
    same bytes uploaded (without its upload limits: the trainer's files are trusted)."""
    try:
        return load_input(path.read_bytes(), spec)
    except DecodeError as e:
        raise DataError(f"{path}: {e}") from e


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgrec quantize",
        description="Write a static int8 graph (model.int8.onnx: ONNX Runtime's quantizer, QDQ, "
                    "per-channel, calibrated on training images) from the directory's "
                    "model.onnx, measure its test top-1 and record it in the card. "
                    "IMGREC_PRECISION=int8 serves it only once that figure is in the card.")
    p.add_argument("model_dir")
    p.add_argument("--data", default=None, help="'fashion-mnist', an IDX directory or an "
                   "ImageFolder root (default: the card's training data)")
    p.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                   help="training images sampled for the activation ranges")
    p.add_argument("--test-limit", type=int, default=0,
                   help="measure on the first N test images only (0 = the whole split)")
    p.add_argument("--full-range", action="store_true",
                   help="8-bit weights instead of 7: only for graphs that never run on an x86 "
                        "CPU without VNNI, whose AVX2/AVX-512 int8 kernels saturate their "
                        "int16 sums with 8-bit weights (measured here: -1.3 points top-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads for measuring")
    return p


def quantize_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root, card = open_model_dir(args.model_dir)
    calibration, images, labels, source = load_split_arrays(
        card, args.data, args.calibration_images, args.test_limit, args.seed)
    spec = quantize_model_dir(root, calibration, images, labels, source, not args.full_range,
                              args.threads)
    m: dict[str, Any] = spec.metrics
    print(f"wrote {root / spec.file} (sha256 {spec.sha256}): test top-1 {m['test_top1']:.2f}% "
          f"int8 vs {m['float32_test_top1']:.2f}% float32 on {m['test_images']} images "
          f"({m['top1_difference_points']:+.2f} points)", file=sys.stderr)
    return 0
