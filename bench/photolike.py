"""Photo-like JPEGs made from Fashion-MNIST garments, for the photo benchmark and tests.

A phone photo is large (12-48 MP), a few MB (sensor noise and texture keep JPEG from compressing
it much) and in colour. ``photo_like`` stretches a 28x28 garment to the photo's size (so the
card's `stretch` resize brings it back to what the model was trained on), tints it, lights it
unevenly and adds grain, then encodes it as a phone does (4:2:0, quality 90-95).

The grain is cut from one pre-made noise field at a seeded offset, so that thousands of distinct
photos cost seconds to make rather than minutes; garment, tint, light and offset differ per photo.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

# a 4:3 12 MP photo, as most phones write by default
PHOTO_12MP = (4032, 3024)
_MARGIN = 256


@lru_cache(maxsize=4)
def _grain(width: int, height: int, sigma: float) -> np.ndarray:
    """Gaussian grain a margin larger than the photo, float32, shared by all photos of that size."""
    rng = np.random.default_rng(12345)
    field = rng.standard_normal((height + _MARGIN, width + _MARGIN, 3), dtype=np.float32)
    field *= sigma
    return field


def photo_like(garment: np.ndarray, size: tuple[int, int] = PHOTO_12MP, seed: int = 0,
               quality: int = 92, grain: float = 7.0) -> Image.Image:
    """A (height, width) uint8 garment -> an RGB photo of ``size`` (width, height)."""
    width, height = size
    rng = np.random.default_rng(seed)
    big = Image.fromarray(garment, mode="L").resize(size, Image.Resampling.BICUBIC)
    base = np.asarray(big, dtype=np.float32)
    tint = rng.uniform(0.75, 1.0, 3).astype(np.float32)
    # uneven light: a gentle horizontal and vertical ramp, as from a window
    ramp_x = np.linspace(1.0 - rng.uniform(0, 0.15), 1.0, width, dtype=np.float32)
    ramp_y = np.linspace(1.0, 1.0 - rng.uniform(0, 0.15), height, dtype=np.float32)
    lit = base[:, :, None] * tint[None, None, :] * (ramp_y[:, None, None] * ramp_x[None, :, None])
    noise = _grain(width, height, grain)
    oy, ox = (int(v) for v in rng.integers(0, _MARGIN, 2))
    pixels = np.clip(lit + 12.0 + noise[oy : oy + height, ox : ox + width], 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def jpeg_bytes(image: Image.Image, quality: int = 92, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling="4:2:0", **kw)
    return buf.getvalue()
