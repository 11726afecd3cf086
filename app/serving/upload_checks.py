"""Upload bytes -> the network's input pixels, with the checks that keep bad input harmless.

Runs on the decode thread pool, or on the event loop for an image that decodes to fewer than
``decode_inline_pixels`` (``only_below``: it stops at the header otherwise). Torch-free: the
pixels come from ``app.model.decode``, the same code the trainer loads its images with.

Every upload is opened once; Pillow reads only the header. Before any pixel data is decoded:
1. the format must be one of ``ALLOWED_FORMATS`` (415);
2. the header's width x height must be within ``max_header_pixels`` (413), a hard ceiling that
   refuses decompression bombs whatever the format;
3. the decoder is set to decode at the size needed (a JPEG at 1/2, 1/4 or 1/8 scale) and what it
   will then hold, the decoded pixels, must be within ``max_pixels`` (413). A 48 MP JPEG decoded
   at 1/8 costs 0.75 MP; a 48 MP PNG, HEIC or WebP costs 48 MP; a progressive JPEG costs its full
   size (libjpeg keeps all its coefficients).
The memory decoding can take is therefore at most (decode threads) x ``max_pixels`` x 4 bytes,
whatever is uploaded.
"""

from __future__ import annotations

from app.model.card import InputSpec
from app.model.decode import HEIF_AVAILABLE, DecodeError, open_image, plan_decode, prepare_opened
from app.serving.errors import ServiceError
from app.settings import MAX_IMAGE_HEADER_PIXELS

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF"} | (
    {"HEIF"} if HEIF_AVAILABLE else set())



class ImageError(ServiceError, ValueError):
    """A bad upload (413 or 415): one of the Service's refusals, so every skin answers it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=code, status=status)


def check_header(fmt: str, width: int, height: int, max_header_pixels: int) -> None:
    """415 / 413 for a disallowed format or a huge image, from the header alone."""
    if fmt not in ALLOWED_FORMATS:
        raise ImageError(415, "unsupported_image",
                         f"image format {fmt or 'unknown'} is not allowed; send one of "
                         f"{', '.join(sorted(ALLOWED_FORMATS))}")
    if width < 1 or height < 1:
        raise ImageError(415, "unsupported_image", "image has no pixels")
    if width * height > max_header_pixels:
        raise ImageError(413, "image_too_large",
                         f"image is {width}x{height} = {width * height} pixels; the limit is "
                         f"{max_header_pixels}")


class NotSmall(Exception):
    """``prepare(..., only_below=N)`` found an image that decodes to N pixels or more: decode
    it elsewhere (the decode pool), not where the caller stands (the event loop)."""


def prepare(data: bytes, spec: InputSpec, max_pixels: int,
            max_header_pixels: int = MAX_IMAGE_HEADER_PIXELS,
            only_below: int | None = None) -> bytes:
    """Header checks, decode at the size needed, orientation, colour and the card's resize;
    returns the image's pixels as uint8 bytes in (channels, size, size) order. Normalisation is
    the engine's, once per batch. With ``only_below``, an image that passes the checks but
    decodes to that many pixels or more raises NotSmall before any pixel is decoded.

    Bytes, not an array: the inference thread joins a batch's images into one buffer and hands
    it to the engine without a single call that lets go of the GIL (every release there can cost
    the thread a whole switch interval waiting for the event loop to give it back)."""
    if not data:
        raise ImageError(415, "unsupported_image", "empty file")
    try:
        im = open_image(data)
    except DecodeError as e:
        raise ImageError(415, "unsupported_image", "not an image in an allowed format "
                         f"({', '.join(sorted(ALLOWED_FORMATS))})") from e
    with im:
        fmt = im.format or ""
        check_header(fmt, *im.size, max_header_pixels)
        try:
            plan = plan_decode(im, data, spec)
        except (OSError, ValueError, RuntimeError) as e:
            raise ImageError(415, "undecodable_image", f"the {fmt} image could not be decoded "
                             "(truncated or corrupt?)") from e
        if plan.decoded_pixels > max_pixels:
            w, h = plan.stored_size
            raise ImageError(413, "image_too_large",
                             f"the {w}x{h} {fmt} image decodes to {plan.decoded_pixels} pixels; "
                             f"the limit is {max_pixels}")
        if only_below is not None and plan.decoded_pixels >= only_below:
            raise NotSmall
        try:
            return prepare_opened(im, data, plan, spec).tobytes()
        except DecodeError as e:
            raise ImageError(415, "undecodable_image", f"the {fmt} image could not be decoded "
                             "(truncated or corrupt?)") from e
