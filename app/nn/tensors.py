"""Tensor-side helpers over ``app.model.decode`` for the trainer, evaluation and the torch engine.

The pixels themselves (decode at the size needed, orientation, colour, the card's resize) come
from app.model.decode, which is torch-free and what the service runs; this module only turns them
into tensors and normalises batches.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from app.model.card import InputSpec
from app.model.decode import DecodeError, array_to_input, load_input


def decode_image_bytes(data: bytes, spec: InputSpec) -> Tensor:
    """Encoded image -> uint8 (channels, size, size), exactly the pixels the service computes.
    Raises ValueError for anything undecodable."""
    try:
        return torch.from_numpy(load_input(data, spec))
    except DecodeError as e:
        raise ValueError(f"undecodable image: {e}") from e


def to_input_size(image: Tensor, spec: InputSpec) -> Tensor:
    """uint8 (C, H, W) of any size, C in 1..4 -> uint8 (channels, size, size) by the card's
    colour and resize rules (an image already at the input size and channels is returned as is).

    Serving stops here: normalisation happens once per batch on the device (normalize_batch),
    and a uint8 image is a quarter of the bytes to queue and to copy to a GPU."""
    if tuple(image.shape) == (spec.channels, spec.size, spec.size):
        return image
    return torch.from_numpy(array_to_input(np.ascontiguousarray(image.numpy()), spec))


def normalize_batch(images: Tensor, spec: InputSpec, dtype: torch.dtype = torch.float32
                    ) -> Tensor:
    """uint8 (N, C, size, size) at the input size -> (x / 255 - mean) / std, on its device."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in spec.std], device=images.device)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std, strict=True)],
                         device=images.device)
    x = images.to(torch.float32) * scale.view(1, -1, 1, 1) - shift.view(1, -1, 1, 1)
    return x.to(dtype)
