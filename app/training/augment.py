"""The patent's training augmentation (claims 10-12), built from torchvision transforms v2.

Crop a region whose area fraction and aspect ratio are drawn from configured ranges, resize it to
the set size, then perturb it: flip with probability p1, rotate by an angle drawn from a range with
probability p2, adjust colour attributes with probability p3. Random erasing may follow.
Inputs are the card's input (uint8 (C, size, size), app.model.decode's pixels) and so are the
outputs; normalisation happens on the batch.
"""

from __future__ import annotations

import math

from torch import nn
from torchvision.transforms import v2

from app.training.config import TrainConfig


def crop_resize(cfg: TrainConfig, size: int) -> v2.RandomResizedCrop:
    return v2.RandomResizedCrop(size, scale=cfg.crop_area, ratio=cfg.crop_aspect, antialias=True)


def rotation(cfg: TrainConfig) -> v2.RandomRotation:
    return v2.RandomRotation(list(cfg.rotate_deg), interpolation=v2.InterpolationMode.BILINEAR)


def colour(cfg: TrainConfig, channels: int) -> v2.ColorJitter:
    return v2.ColorJitter(
        brightness=cfg.brightness or None,
        contrast=cfg.contrast or None,
        saturation=(cfg.saturation or None) if channels == 3 else None,
    )


def build_train_transform(cfg: TrainConfig, size: int, channels: int) -> nn.Module:
    steps: list[nn.Module] = [
        crop_resize(cfg, size),                                   # claims 10, 11
        v2.RandomHorizontalFlip(p=cfg.flip_p),                    # claim 12, p1
        v2.RandomApply([rotation(cfg)], p=cfg.rotate_p),          # claim 12, p2
    ]
    if cfg.brightness or cfg.contrast or (cfg.saturation and channels == 3):
        steps.append(v2.RandomApply([colour(cfg, channels)], p=cfg.color_p))  # claim 12, p3
    if cfg.erase_p > 0:
        steps.append(v2.RandomErasing(p=cfg.erase_p, scale=(0.02, 0.2), value=0))
    return v2.Compose(steps)


def crop_geometry(params: dict[str, int], height: int, width: int) -> tuple[float, float]:
    """(area fraction, aspect ratio) of a RandomResizedCrop draw, for checks and tests."""
    h, w = params["height"], params["width"]
    return (h * w) / (height * width), w / h if h else math.inf
