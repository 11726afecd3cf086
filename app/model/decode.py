"""Encoded image -> the network's uint8 input, exactly as the card says: the one implementation
the service (app/serving/upload_checks.py) and the trainer (app/training/data.py) both run.

Torch-free on purpose (Pillow and numpy only): the CPU serving process never imports torch.

The steps (the orientation, 3, is applied last: see there):
1. **Decode at the size needed.** A JPEG is decoded in the DCT domain (libjpeg-turbo, through
   simplejpeg or Pillow's ``draft``) at the smallest scale (1/2 ... 1/8) that still leaves at
   least twice the input size on both sides, so the final antialiased resize has the detail it
   needs; both decoders give the same pixels. Grey models ask libjpeg for the luma channel
   alone. The other formats are decoded at full size: PNG, GIF, BMP and TIFF have no reduced
   decode; libwebp can scale but Pillow does not expose it; libheif and libavif cannot.
2. **First frame** of an animated GIF, PNG or WebP, first page of a TIFF.
3. **Orientation.** The EXIF Orientation tag (JPEG, PNG, WebP, TIFF, AVIF; or XMP's) is applied
   as ``ImageOps.exif_transpose`` would. Decoding, colour and both resize rules (which keep a
   square around the centre) commute with turning and mirroring, so the small result is turned,
   not the large decoded image; a scaled JPEG's partial last block is weighed by what it covers,
   so a turned photo gives the upright one's pixels.
   HEIF's own rotation and mirroring (irot/imir) are applied by libheif while decoding and the
   EXIF tag is then reset, so nothing is rotated twice.
4. **Colour.** To the card's channels: grey ``L`` (ITU-R 601 luma) or ``RGB``. Alpha (RGBA, LA,
   PA, and palette images with a transparent colour) is composited onto black, i.e. a transparent
   pixel contributes no light: deterministic whatever colour an encoder left under it, and the
   dark background Fashion-MNIST-style models were trained on. 16-bit grey (``I;16``, ``I``) is
   scaled to 8 bits (v / 257), not clipped; CMYK and other modes use Pillow's conversion.
   Embedded ICC profiles are not applied (as in the usual Pillow/torchvision training loaders).
5. **Resize rule** (``InputSpec.resize``): ``stretch`` resizes the whole image to size x size;
   ``shorter-side-crop`` (the ImageNet convention) scales the shorter side to the input size and
   takes the centre square (one antialiased bilinear pass over that square of the source).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from app.model.card import InputSpec

try:  # HEIF/HEIC (phones' default on iOS) and its EXIF/irot handling; AVIF is Pillow's own
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_AVAILABLE = True
except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
    HEIF_AVAILABLE = False

try:  # JPEG decoding straight from the bytes, scaled in the DCT domain (see plan_decode)
    import simplejpeg

    HAVE_SIMPLEJPEG = True
except ImportError:  # pragma: no cover - simplejpeg is a declared dependency; Pillow is used
    HAVE_SIMPLEJPEG = False


# the decode keeps at least this many times the input size on both sides before the resize
DECODE_HEADROOM = 2
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
SIXTEEN_BIT_GREY = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# Pillow's own bomb check raises its own error type; the caller checks the pixels it will decode
Image.MAX_IMAGE_PIXELS = None


class DecodeError(ValueError):
    """The bytes are not an image Pillow can open, or its pixel data is truncated or corrupt."""


@dataclass(frozen=True)
class Plan:
    """What decoding an opened image will cost, known before any pixel data is decoded."""

    format: str
    stored_size: tuple[int, int]  # (width, height) in the header
    decoded_size: tuple[int, int]  # (width, height) the decoder will produce
    decoded_pixels: int  # what the decode holds in memory, in pixels (the limit applies to it)
    decoder: Literal["simplejpeg", "pillow"] = "pillow"
    reduction: int = 1  # the decoder divides each side by this (rounding up)

    @property
    def extent(self) -> tuple[float, float]:
        """The stored image's area in decoded pixels: a side that is not a multiple of the
        reduction ends in a partial pixel, which the resize weighs by what it covers."""
        return self.stored_size[0] / self.reduction, self.stored_size[1] / self.reduction


def open_image(data: bytes) -> Image.Image:
    """Read the header only (Pillow decodes lazily). Raises DecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data))
    # RuntimeError: Pillow's AVIF plugin on a corrupt file ("Failed to decode image: Missing or
    # empty image item"), found by tests/api/test_fuzz_properties.py
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, RuntimeError) as e:
        raise DecodeError(f"not a readable image: {e}") from e


def plan_decode(im: Image.Image, data: bytes, spec: InputSpec, scale: bool = True) -> Plan:
    """Choose the decoder and the scale for an opened image and say what decoding will cost.

    Must be called on a freshly opened image, before its pixels are loaded. A JPEG is scaled by
    the largest of 1/8, 1/4 and 1/2 that leaves ``DECODE_HEADROOM`` x the input size on both
    sides (Pillow's ``draft`` rule). One in YCbCr or grey is decoded by simplejpeg (libjpeg-turbo's
    TurboJPEG API straight from the bytes: about a fifth less CPU than Pillow at the same scale,
    bench/photos.py --decoders); anything it refuses (CMYK, YCCK, a stream libjpeg warns about)
    by Pillow at the same scale. ``scale=False`` decodes at full size (the reference the
    scaled decode is measured against)."""
    fmt = im.format or ""
    stored = im.size
    decoder: Literal["simplejpeg", "pillow"] = "pillow"
    if scale and fmt == "JPEG" and stored != (spec.size, spec.size):
        need = spec.size * DECODE_HEADROOM
        if HAVE_SIMPLEJPEG and im.mode in ("RGB", "L"):
            decoder = "simplejpeg"
        mode = "L" if spec.channels == 1 and im.mode == "RGB" else im.mode
        im.draft(mode, (need, need))  # sets im.size to the scaled size
    decoded = im.size
    reduction = next((r for r in (8, 4, 2) if decoded == (-(-stored[0] // r), -(-stored[1] // r))),
                     1)
    pixels = decoded[0] * decoded[1]
    if fmt == "JPEG" and (im.info.get("progressive") or im.info.get("progression")):
        # libjpeg keeps a progressive JPEG's whole coefficient buffer, whatever the output scale
        pixels = stored[0] * stored[1]
    return Plan(fmt, stored, decoded, pixels, decoder, reduction)


def decode(im: Image.Image, data: bytes, plan: Plan, channels: int) -> Image.Image:
    """Decode the first frame as planned, as stored (``orient`` turns it upright later).
    Raises DecodeError."""
    if plan.decoder == "simplejpeg":
        w, h = plan.decoded_size
        try:
            # the largest libjpeg scale-down that keeps (w, h) is the one Pillow's draft chose
            arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB",
                                         min_height=h, min_width=w)
        except ValueError:  # anything libjpeg warns about: Pillow's verdict, at the same scale
            arr = None
        if arr is not None and arr.shape[:2] == (h, w):
            return Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
    except (OSError, SyntaxError, EOFError, ValueError, IndexError, KeyError,
            TypeError, ZeroDivisionError, RuntimeError) as e:  # Pillow's decoders on bad data
        # (RuntimeError: AVIF, "Failed to decode frame 0: Decoding of color planes failed")
        raise DecodeError(f"the {im.format or ''} image could not be decoded: {e}") from e
    return im


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(im: Image.Image) -> int:
    """The EXIF (or XMP) Orientation, 1-8; 1 when absent or unreadable: a damaged EXIF block
    loses the tag, not the photo. Same source as ``ImageOps.exif_transpose``."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # any parse failure of the metadata block
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """A decoded image of any Pillow mode -> ``L`` (channels 1) or ``RGB`` (channels 3)."""
    target = "L" if channels == 1 else "RGB"
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        alpha = im.getchannel("A" if mode in ("RGBA", "LA", "PA") else "a")
        colour = im.convert("RGBA" if mode in ("PA", "RGBa", "La") else mode).convert(target)
        out = Image.new(target, im.size, 0)
        out.paste(colour, mask=alpha)  # colour * alpha + black * (1 - alpha)
        return out
    if mode in SIXTEEN_BIT_GREY:
        values = np.asarray(im).astype(np.uint32)
        grey = Image.fromarray(((np.clip(values, 0, 65535) * 255 + 32767) // 65535)
                               .astype(np.uint8), mode="L")
        return grey if target == "L" else grey.convert("RGB")
    return im if mode == target else im.convert(target)


def resize(im: Image.Image, spec: InputSpec,
           extent: tuple[float, float] | None = None) -> Image.Image:
    """The card's resize rule, antialiased bilinear, to size x size. ``extent`` is the part of
    the image that holds picture (a scaled JPEG's partial last row and column hold less).

    Both rules give a square around the centre, so they commute with the orientation: applied
    to the image as stored, then turned (``orient``), they give what they give on the upright
    image, at a fraction of the cost of turning a large one."""
    size = spec.size
    w, h = extent or im.size
    if spec.resize == "shorter-side-crop":
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    else:
        box = (0.0, 0.0, w, h)
    if im.size == (size, size) and box == (0.0, 0.0, size, size):
        return im
    return im.resize((size, size), Image.Resampling.BILINEAR, box=box)


def orient(im: Image.Image, orientation: int) -> Image.Image:
    """Turn or mirror as the EXIF Orientation says (as ``ImageOps.exif_transpose`` does)."""
    method = _TRANSPOSE.get(orientation)
    return im if method is None else im.transpose(method)


def to_array(im: Image.Image, channels: int) -> np.ndarray:
    """An ``L`` or ``RGB`` image -> uint8 (channels, H, W), C-contiguous."""
    arr = np.asarray(im)
    if channels == 1:
        return arr[None, :, :].copy() if arr.ndim == 2 else arr
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def prepare_opened(im: Image.Image, data: bytes, plan: Plan, spec: InputSpec) -> np.ndarray:
    """An opened image and its plan -> uint8 (channels, size, size). Raises DecodeError."""
    decoded = decode(im, data, plan, spec.channels)
    square = resize(to_mode(decoded, spec.channels), spec, plan.extent)
    return to_array(orient(square, orientation(im)), spec.channels)


def load_input(data: bytes, spec: InputSpec, scale: bool = True) -> np.ndarray:
    """Encoded bytes -> uint8 (channels, size, size) as the service computes it, without the
    service's limits (the trainer's files are trusted). Raises DecodeError."""
    with open_image(data) as im:
        return prepare_opened(im, data, plan_decode(im, data, spec, scale), spec)


def array_to_input(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (C, H, W) with C in 1..4 (already decoded, e.g. IDX data) -> uint8 (channels, size,
    size) by the same colour and resize rules."""
    if image.ndim != 3 or image.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"expected a (C, H, W) image, got shape {image.shape}")
    modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    c = image.shape[0]
    pixels = image[0] if c == 1 else image.transpose(1, 2, 0)
    im = Image.fromarray(np.ascontiguousarray(pixels), mode=modes[c])
    return to_array(resize(to_mode(im, spec.channels), spec), spec.channels)
