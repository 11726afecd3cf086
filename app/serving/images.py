"""Upload bytes -> the network's input tensor, with the checks that keep bad input harmless.

Runs on the decode thread pool, never on the event loop. The format and pixel count are read from
the header (PIL reads only the header on open) before anything is decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.nn.card import InputSpec
from app.nn.preprocess import pil_to_tensor, to_input_size

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


def check_header(fmt: str, width: int, height: int, max_pixels: int) -> None:
    """415 / 413 for a disallowed format or a huge image, from the header alone."""
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


def prepare(data: bytes, spec: InputSpec, max_pixels: int) -> bytes:
    """Header check, decode, convert as the card says; returns the image's pixels as uint8 bytes
    in (channels, size, size) order. Normalisation is the engine's, once per batch.

    Bytes, not a tensor: the inference thread joins a batch's images into one buffer and hands it
    to the engine without a single call that lets go of the GIL (every release there can cost the
    thread a whole switch interval waiting for the event loop to give it back).

    The image is opened once: Pillow reads only the header on open, the checks run on it, and
    only then are the pixels decoded. An image already at the input size is converted by Pillow
    alone; any other size goes through the trainer's own resize (``to_input_size``)."""
    if not data:
        raise ImageError(415, "unsupported_image", "empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ImageError(415, "unsupported_image", "not an image in an allowed format "
                             f"({', '.join(sorted(ALLOWED_FORMATS))})") from e
        with im:
            fmt = im.format or ""
            check_header(fmt, *im.size, max_pixels)
            try:
                if im.size == (spec.size, spec.size):
                    return _pixels_at_size(im, spec.channels)
                image = pil_to_tensor(im, spec.channels)
            except (OSError, SyntaxError, EOFError, ValueError) as e:
                raise ImageError(415, "undecodable_image", f"the {fmt} image could not be "
                                 "decoded (truncated or corrupt?)") from e
    return to_input_size(image, spec).numpy().tobytes()


def _pixels_at_size(im: Image.Image, channels: int) -> bytes:
    """The same pixels as ``pil_to_tensor`` (first frame, Pillow's colour conversion), as
    (channels, H, W) bytes without a tensor in between."""
    im.seek(0)
    converted = im.convert("L" if channels == 1 else "RGB")
    if channels == 1:
        return converted.tobytes()
    return np.asarray(converted).transpose(2, 0, 1).tobytes()
