"""Test images made in the test itself: seeded random PNGs, and any Pillow image encoded."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def png_bytes(seed: int, size: int = 28, mode: str = "L") -> bytes:
    """A size x size PNG of random pixels, the same bytes for the same seed."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    return encode(img, "PNG")


def encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    """The image saved in a format (Pillow's name: PNG, JPEG, WEBP...) with its options."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()
