"""Upload bytes -> the network's input tensor, with the checks that keep bad input harmless.

Runs on the decode thread pool, never on the event loop. The format and pixel count are read from
the header (PIL reads only the header on open) before anything is decoded.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from app.nn.card import InputSpec
from app.nn.preprocess import decode_image_bytes, to_input_size

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF"}

# Our own pixel limit is checked first; PIL's bomb check would raise a different error type.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """A bad upload: carries the HTTP status and error code it should be answered with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def inspect_header(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; 415 / 413 for bad or huge images."""
    if not data:
        raise ImageError(415, "unsupported_image", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                fmt, (width, height) = im.format or "", im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(415, "unsupported_image",
                         f"not an image in an allowed format ({', '.join(sorted(ALLOWED_FORMATS))})"
                         ) from e
    if fmt not in ALLOWED_FORMATS:
        raise ImageError(415, "unsupported_image",
                         f"image format {fmt or 'unknown'} is not allowed; send one of "
                         f"{', '.join(sorted(ALLOWED_FORMATS))}")
    if width < 1 or height < 1:
        raise ImageError(415, "unsupported_image", "image has no pixels")
    if width * height > max_pixels:
        raise ImageError(413, "image_too_large",
                         f"image is {width}x{height} = {width * height} pixels; the limit is "
                         f"{max_pixels}")
    return fmt, width, height


def decode(data: bytes, fmt: str, channels: int) -> Tensor:
    """uint8 (channels, H, W); 415 when the image turns out truncated or corrupt."""
    try:
        return decode_image_bytes(data, channels)
    except ValueError as e:
        raise ImageError(415, "undecodable_image", f"the {fmt} image could not be decoded "
                         f"(truncated or corrupt?)") from e


def prepare(data: bytes, spec: InputSpec, max_pixels: int) -> Tensor:
    """Header check, decode, convert as the card says: uint8 (channels, size, size); the
    normalisation is done per batch (app.nn.preprocess.normalize_batch)."""
    fmt, _, _ = inspect_header(data, max_pixels)
    image = decode(data, fmt, spec.channels)
    return to_input_size(image, spec)
