"""Photo-like JPEGs made from Fashion-MNIST garments, for the photo benchmark and tests.

A phone photo is large (12-48 MP), a few MB (sensor noise and texture keep JPEG from compressing
it much) and in colour. ``photo_like`` stretches a 28x28 garment to the photo's size (so the
card's `stretch` resize brings it back to what the model was trained on), tints it, lights it
unevenly and adds grain; ``jpeg_bytes`` encodes it as a phone does (4:2:0).

Everything runs in Pillow's C code, and the grain is cut from one pre-made noise field at a
seeded offset, so thousands of distinct photos cost minutes rather than hours; garment, tint,
light and offset differ per photo.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops

# a 4:3 12 MP photo, as most phones write by default
PHOTO_12MP = (4032, 3024)
_MARGIN = 256


@lru_cache(maxsize=8)
def _grain(width: int, height: int, sigma: float) -> Image.Image:
    """Gaussian grain around 128, a margin larger than the photo, shared by photos of a size."""
    rng = np.random.default_rng(12345)
    field = rng.standard_normal((height + _MARGIN, width + _MARGIN, 3), dtype=np.float32)
    return Image.fromarray(np.clip(field * sigma + 128, 0, 255).astype(np.uint8), mode="RGB")


def photo_like(garment: np.ndarray, size: tuple[int, int] = PHOTO_12MP, seed: int = 0,
               grain: float = 7.0) -> Image.Image:
    """A (height, width) uint8 garment -> an RGB photo of ``size`` (width, height)."""
    width, height = size
    rng = np.random.default_rng(seed)
    # tint: each channel scaled by 0.75-1.0, lifted a little off black, as a lens flare does
    tint = rng.uniform(0.75, 1.0, 3)
    grey = Image.fromarray(garment, mode="L").resize(size, Image.Resampling.BICUBIC)
    bands = [grey.point([min(255, round(12 + v * t)) for v in range(256)]) for t in tint]
    colour = Image.merge("RGB", bands)
    # uneven light: a gentle diagonal ramp, as from a window
    ramp = Image.linear_gradient("L").rotate(float(rng.uniform(0, 360))).resize(size)
    dim = float(rng.uniform(0.0, 0.15))
    light = ramp.point([round(255 * (1 - dim * v / 255)) for v in range(256)]).convert("RGB")
    lit = ImageChops.multiply(colour, light)
    ox, oy = (int(v) for v in rng.integers(0, _MARGIN, 2))
    noise = _grain(width, height, grain).crop((ox, oy, ox + width, oy + height))
    return ImageChops.add(lit, noise, scale=1.0, offset=-128)


def jpeg_bytes(image: Image.Image, quality: int = 92, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling="4:2:0", **kw)
    return buf.getvalue()
