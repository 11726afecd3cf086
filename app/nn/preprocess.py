"""Turn a decoded image into the network's input exactly as the card says (serving and eval)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from app.nn.card import InputSpec


def to_channels(image: Tensor, channels: int) -> Tensor:
    """uint8 (C, H, W) with C in 1..4 -> uint8 (channels, H, W); alpha is dropped."""
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(image.shape)}")
    c = image.shape[0]
    if c in (2, 4):  # grey+alpha, RGBA: drop alpha
        image = image[: c - 1]
        c -= 1
    if c == channels:
        return image
    if channels == 1:
        return F.rgb_to_grayscale(image, num_output_channels=1)
    return image.expand(3, -1, -1)


def preprocess(image: Tensor, spec: InputSpec) -> Tensor:
    """uint8 (C, H, W) of any size and colour mode -> float32 (channels, size, size), normalised."""
    image = to_channels(image, spec.channels)
    if image.shape[-2:] != (spec.size, spec.size):
        image = F.resize(image, [spec.size, spec.size],
                         interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    x = image.to(torch.float32).div_(255.0)
    return F.normalize(x, mean=spec.mean, std=spec.std)


def normalize_batch(images: Tensor, spec: InputSpec) -> Tensor:
    """uint8 (N, C, size, size) already at the input size -> normalised float32 batch."""
    x = images.to(torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std
