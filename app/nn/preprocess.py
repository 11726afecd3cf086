"""Turn a decoded image into the network's input exactly as the card says (serving and eval)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from app.nn.card import InputSpec


def decode_image_bytes(data: bytes, channels: int) -> Tensor:
    """Encoded image -> uint8 (channels, H, W); GIFs give their first frame, alpha is dropped.
    Raises ValueError for anything undecodable.

    Pillow decodes every format. torchvision.io.decode_image was 2-3x faster on small PNGs, but
    it crashed the process (SIGSEGV) on corrupted PNGs (tests/test_api.py); Pillow's decoders are
    fuzzed continuously and raise errors instead; they cost 30-150 us per image here
    (measured on a 2-core CPU), small next to an HTTP request."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as im:
                return pil_to_tensor(im, channels)
        except (OSError, SyntaxError, EOFError) as e:
            raise ValueError(f"undecodable image: {e}") from e


def pil_to_tensor(im: Image.Image, channels: int) -> Tensor:
    """An opened Pillow image (first frame) -> uint8 (channels, H, W); this is where the pixel
    data is decoded, so OSError/SyntaxError/EOFError/ValueError mean truncated or corrupt."""
    im.seek(0)
    arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    tensor = torch.from_numpy(arr.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


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


def to_input_size(image: Tensor, spec: InputSpec) -> Tensor:
    """uint8 (C, H, W) of any size and colour mode -> uint8 (channels, size, size).

    Serving stops here: normalisation happens once per batch on the device (normalize_batch),
    and a uint8 image is a quarter of the bytes to queue and to copy to a GPU."""
    image = to_channels(image, spec.channels)
    if image.shape[-2:] != (spec.size, spec.size):
        image = F.resize(image, [spec.size, spec.size],
                         interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return image


def preprocess(image: Tensor, spec: InputSpec) -> Tensor:
    """uint8 (C, H, W) of any size and colour mode -> float32 (channels, size, size), normalised."""
    return normalize_batch(to_input_size(image, spec).unsqueeze(0), spec)[0]


def normalize_batch(images: Tensor, spec: InputSpec, dtype: torch.dtype = torch.float32
                    ) -> Tensor:
    """uint8 (N, C, size, size) at the input size -> (x / 255 - mean) / std, on its device."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in spec.std], device=images.device)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std, strict=True)],
                         device=images.device)
    x = images.to(torch.float32) * scale.view(1, -1, 1, 1) - shift.view(1, -1, 1, 1)
    return x.to(dtype)
