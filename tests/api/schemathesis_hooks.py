"""schemathesis hooks (loaded through SCHEMATHESIS_HOOKS by tests/api/test_openapi_conformance.py).

The upload routes document their ``file`` parts as images of the media types of
``ALLOWED_FORMATS`` (``encoding.contentType``). schemathesis cannot make a valid image of a
media type by itself (its samples cover four formats, one 1x1 picture each), so this registers,
for every image format that Pillow can write, a strategy that draws a real image: random
size, colour mode and pixels, encoded in that format. Schema-valid uploads are then real images
and must be answered 200; everything else schemathesis sends must be refused with a 4xx.
"""

from __future__ import annotations

import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image

import app.serving.upload_checks  # noqa: F401  (the decoder plugins it registers join Image.SAVE)

MODES = ("L", "RGB", "RGBA", "P", "1")


@st.composite
def _image(draw: st.DrawFn, fmt: str) -> bytes:
    width = draw(st.integers(1, 48))
    height = draw(st.integers(1, 48))
    mode = draw(st.sampled_from(MODES))
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = draw(st.binary(min_size=width * height * bands, max_size=width * height * bands))
    im = Image.frombytes("L" if mode in ("P", "1") else mode, (width, height), pixels)
    if mode in ("P", "1"):
        im = im.convert(mode)
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt)
    except (OSError, ValueError):  # a mode this format cannot store (JPEG and RGBA, ...)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


# Every image format Pillow can write; schemathesis uses the ones a schema's contentType names.
Image.init()
_registered: set[str] = set()
for fmt, media_type in sorted(Image.MIME.items()):  # BMP before DIB (a BMP without its header)
    if media_type.startswith("image/") and fmt in Image.SAVE and media_type not in _registered:
        schemathesis.openapi.media_type(media_type, _image(fmt))
        _registered.add(media_type)
