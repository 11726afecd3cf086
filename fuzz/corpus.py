"""The seed corpus: small valid inputs of every kind the fuzz targets take, made here so that no
binary file needs to live in the repository."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from app.serving.upload_checks import ALLOWED_FORMATS
from fuzz.targets import BOUNDARY


def images() -> dict[str, bytes]:
    """One small picture per allowed format Pillow can write (plus TIFF, refused today), in a
    few modes and sizes."""
    rng = np.random.default_rng(0)
    out: dict[str, bytes] = {}
    Image.init()
    for fmt in sorted(ALLOWED_FORMATS | {"TIFF"}):
        if fmt not in Image.SAVE:
            continue
        for mode, size in (("L", (8, 8)), ("RGB", (28, 28)), ("RGBA", (5, 3)), ("P", (16, 9))):
            shape = (size[1], size[0]) if mode in ("L", "P") else (size[1], size[0], len(mode))
            im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8),
                                 mode="L" if mode == "P" else mode)
            if mode == "P":
                im = im.convert("P")
            buf = io.BytesIO()
            try:
                im.save(buf, format=fmt)
            except (OSError, ValueError):
                continue
            out[f"{fmt.lower()}-{mode}-{size[0]}x{size[1]}"] = buf.getvalue()
    return out


def part(name: str, data: bytes, filename: str | None = None,
         content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"Content-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return b"--" + BOUNDARY + b"\r\n" + head.encode() + b"\r\n" + data + b"\r\n"


def bodies() -> dict[str, bytes]:
    pics = list(images().values())
    end = b"--" + BOUNDARY + b"--\r\n"
    one = part("file", pics[0], "a.png", "image/png") + end
    return {
        "one-file": one,
        "two-files": part("file", pics[1], "b") + part("file", pics[2], "c.gif") + end,
        "other-parts": part("x", b"1") + part("file", pics[3], "d") + part("y", b"{}") + end,
        "no-filename": part("file", b"abc") + end,
        "quoted-name": (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="fi\\"le"; '
                        b'filename="q\\".png"\r\n\r\nxyz\r\n' + end),
        "preamble-epilogue": b"preamble\r\n" + one + b"epilogue",
        "no-file": part("other", b"zzz") + end,
        "truncated": one[: len(one) // 2],
        "empty": end,
    }
