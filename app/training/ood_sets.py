"""Pictures for measuring the unknown decision and the class maps, made here (no download):
far out-of-distribution images no garment looks like, and garments pasted into one quadrant of
a larger black canvas. Each is an encoded file, prepared by the server's own decode path.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 96  # far-OOD pictures are made at this side; the card's resize brings them to its input


def _png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                 "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"):
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default()


def _noise(rng: np.random.Generator) -> list[Image.Image]:
    out = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
           for _ in range(6)]
    out += [Image.fromarray(np.clip(rng.normal(128, s, (SIZE, SIZE)), 0, 255).astype(np.uint8))
            for s in (20, 40, 60, 80)]
    return out


def _flat() -> list[Image.Image]:
    colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (255, 0, 0), (0, 255, 0),
               (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (64, 64, 64),
               (200, 150, 100), (30, 60, 90)]
    return [Image.new("RGB", (SIZE, SIZE), c) for c in colours]


def _gradients() -> list[Image.Image]:
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    radial = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    planes = [np.tile(ramp, (SIZE, 1)), np.tile(ramp[:, None], (1, SIZE)),
              255 - np.tile(ramp, (SIZE, 1)), (xx + yy) / 2 * 255 / SIZE,
              255 * radial / radial.max(), 255 - 255 * radial / radial.max()]
    out = [Image.fromarray(p.astype(np.uint8)) for p in planes]
    out += [Image.fromarray(np.stack([planes[0], planes[1], planes[4]], -1).astype(np.uint8)),
            Image.fromarray(np.stack([planes[2], planes[3], planes[5]], -1).astype(np.uint8))]
    return out


def _text() -> list[Image.Image]:
    lines = ["Hello, world", "imgrec", "The quick brown fox", "ERROR 404", "lorem ipsum dolor",
             "Invoice #2026", "README.md", "Fashion?", "a b c d e f", "SALE -50%"]
    out = []
    for i, line in enumerate(lines):
        dark = i % 2 == 0
        im = Image.new("L", (SIZE, SIZE), 255 if dark else 0)
        draw = ImageDraw.Draw(im)
        for row in range(4):  # a page of it
            draw.text((4, 6 + row * 22), line, fill=0 if dark else 255, font=_font(14))
        out.append(im)
    return out


def _digits() -> list[Image.Image]:
    out = []
    for d in range(10):
        im = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(im).text((SIZE // 4, 4), str(d), fill=255, font=_font(80))
        out.append(im)
    return out


def _shapes() -> list[Image.Image]:
    out = []
    s = SIZE
    boxes = [(s * 0.2, s * 0.2, s * 0.8, s * 0.8), (s * 0.1, s * 0.3, s * 0.9, s * 0.7)]
    for fill, bg in ((255, 0), ((255, 80, 0), (0, 0, 0)), ((0, 120, 255), (255, 255, 255))):
        mode = "L" if isinstance(fill, int) else "RGB"
        for kind in ("ellipse", "rectangle", "triangle", "star"):
            im = Image.new(mode, (s, s), bg)
            draw = ImageDraw.Draw(im)
            if kind == "ellipse":
                draw.ellipse(boxes[0], fill=fill)
            elif kind == "rectangle":
                draw.rectangle(boxes[1], fill=fill)
            elif kind == "triangle":
                draw.polygon([(s / 2, s * 0.1), (s * 0.9, s * 0.9), (s * 0.1, s * 0.9)], fill=fill)
            else:
                draw.regular_polygon((s / 2, s / 2, s * 0.4), 5, fill=fill)
            out.append(im)
    return out


def natural_photo_files() -> list[Path]:
    """Photos a package installed here ships (matplotlib's sample data), if any."""
    try:
        import matplotlib
    except ImportError:
        return []
    root = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
    return [p for p in (root / "grace_hopper.jpg", root / "Minduka_Present_Blue_Pack.png")
            if p.is_file()]


def _photos(rng: np.random.Generator) -> list[Image.Image]:
    out = []
    for path in natural_photo_files():
        im = Image.open(path).convert("RGB")
        out.append(im)
        w, h = im.size
        for _ in range(5):  # crops of it: other pictures of the same scene
            side = int(min(w, h) * rng.uniform(0.3, 0.7))
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            out.append(im.crop((x, y, x + side, y + side)))
    return out


def far_ood(seed: int = 0) -> dict[str, list[bytes]]:
    """Far out-of-distribution pictures by kind, as PNG files."""
    rng = np.random.default_rng(seed)
    kinds = {"noise": _noise(rng), "flat colours": _flat(), "gradients": _gradients(),
             "text": _text(), "digits": _digits(), "shapes": _shapes(), "photos": _photos(rng)}
    return {k: [_png(im) for im in v] for k, v in kinds.items() if v}


def quadrant_canvases(images: np.ndarray, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """Each (grey, H x W) garment pasted into one quadrant (0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right) of a black canvas twice its side, as PNG files; and the
    quadrant of each."""
    rng = np.random.default_rng(seed)
    quadrants = rng.integers(0, 4, len(images))
    files = []
    for image, q in zip(images, quadrants, strict=True):
        h, w = image.shape[-2:]
        canvas = np.zeros((2 * h, 2 * w), np.uint8)
        y, x = (q // 2) * h, (q % 2) * w
        canvas[y:y + h, x:x + w] = image.reshape(h, w)
        files.append(_png(Image.fromarray(canvas)))
    return files, quadrants


def peak_quadrant(values: np.ndarray) -> int:
    """The quadrant of a (size, size) map's largest value, row-major as the API answers."""
    size = values.shape[0]
    y, x = divmod(int(values.argmax()), values.shape[1])
    return int(y >= size / 2) * 2 + int(x >= size / 2)
