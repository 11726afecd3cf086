"""Phone photos: orientation, formats and odd modes, limits, and the scaled JPEG decode.

The label checks use the shipped Fashion-MNIST model on real test garments: a photo served the
wrong way up, a 16-bit image clipped to white or a transparent background shown as white all
change what it answers.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from helpers.apps import running
from helpers.images import encode
from helpers.settings import make_settings
from PIL import Image

from app.main import create_app
from app.model.card import InputSpec
from app.model.decode import load_input
from app.serving.upload_checks import ALLOWED_FORMATS, prepare
from app.settings import DEFAULT_MODEL_DIR, Settings
from app.training.data import load_fashion_mnist
from bench.photolike import jpeg_bytes, photo_like

GREY28 = InputSpec(size=28, channels=1, mean=[0.5], std=[0.5])
RGB28 = InputSpec(size=28, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
# how a phone stores an upright picture with each Orientation value: the inverse of the
# transform a viewer applies (2, 3, 4, 5 and 7 are their own inverses)
STORED_AS = {
    1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
}


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, np.ndarray]:
    data = load_fashion_mnist("fashion-mnist")
    return data.test.images[:, 0].numpy(), data.test.labels.numpy()


# the tests that use it share one app, on the module's event loop
on_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shipped(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    """The shipped model served with the default limits."""
    s = make_settings(DEFAULT_MODEL_DIR, tmp_path_factory.mktemp("shipped"))
    async with running(create_app(s)) as c:
        yield c


def stored_with_orientation(upright: Image.Image, orientation: int, fmt: str,
                            **kw: Any) -> bytes:
    method = STORED_AS[orientation]
    stored = upright if method is None else upright.transpose(method)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, fmt, exif=exif.tobytes(), **kw)


async def top_label(client: httpx.AsyncClient, data: bytes) -> int:
    r = await client.post("/predict", files=[("file", ("x", data))])
    assert r.status_code == 200, r.text
    return int(r.json()["results"][0]["labels"][0]["index"])


async def garments(fashion: tuple[np.ndarray, np.ndarray], client: httpx.AsyncClient, n: int
                   ) -> list[tuple[np.ndarray, int]]:
    """The first n test garments the shipped model gets right as plain 28x28 PNGs."""
    images, labels = fashion
    chosen: list[tuple[np.ndarray, int]] = []
    for img, label in zip(images, labels, strict=True):
        if await top_label(client, encode(Image.fromarray(img), "PNG")) == int(label):
            chosen.append((img, int(label)))
        if len(chosen) == n:
            return chosen
    raise AssertionError("the shipped model got fewer than n test garments right")


# -- orientation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,kw,exact", [
    ("PNG", {}, True), ("TIFF", {}, True), ("WEBP", {"lossless": True}, True),
    ("JPEG", {"quality": 95}, False), ("AVIF", {"quality": 95}, False),
    ("HEIF", {"quality": 95}, False),
])
def test_every_exif_orientation_decodes_upright(fmt: str, kw: dict[str, Any], exact: bool,
                                                fashion: tuple[np.ndarray, np.ndarray]) -> None:
    """Stored turned or mirrored with the tag a phone writes, an image decodes to the upright
    one's pixels (for lossless formats within the resize's rounding, 1/255, as the two resize
    passes swap order for a turned image); 600x450 JPEGs take the scaled decode too."""
    garment = fashion[0][0]
    upright = Image.fromarray(garment).resize((600, 450), Image.Resampling.BICUBIC).convert("RGB")
    want = np.frombuffer(prepare(encode(upright, fmt, **kw), RGB28, 10**7), np.uint8)
    naive = np.frombuffer(prepare(encode(upright.transpose(Image.Transpose.ROTATE_90), fmt, **kw),
                                  RGB28, 10**7), np.uint8)
    assert np.abs(naive.astype(int) - want).mean() > 20  # the garment is not symmetric
    for orientation in range(1, 9):
        got = np.frombuffer(prepare(stored_with_orientation(upright, orientation, fmt, **kw),
                                    RGB28, 10**7), np.uint8)
        diff = np.abs(got.astype(int) - want)
        if exact:
            assert diff.max() <= 1, (fmt, orientation)
        else:
            assert diff.mean() < 2.5, (fmt, orientation, diff.mean())


@pytest.mark.slow
@on_module_loop
async def test_a_photo_keeps_its_label_in_every_orientation(
        shipped: httpx.AsyncClient, fashion: tuple[np.ndarray, np.ndarray]) -> None:
    for k, (garment, label) in enumerate(await garments(fashion, shipped, 3)):
        photo = photo_like(garment, (2016, 1512), seed=k)
        for orientation in range(1, 9):
            data = stored_with_orientation(photo, orientation, "JPEG", quality=90)
            assert await top_label(shipped, data) == label, (k, orientation)


# -- formats and modes ---------------------------------------------------------------------------
def variants(garment: np.ndarray, other: np.ndarray) -> dict[str, bytes]:
    """One garment in every accepted format and in the colour modes that need care."""
    g = Image.fromarray(garment).resize((280, 280), Image.Resampling.BICUBIC)
    rgb = g.convert("RGB")
    second = Image.fromarray(other).resize((280, 280), Image.Resampling.BICUBIC)
    out = {fmt: encode(rgb, fmt) for fmt in ("PNG", "BMP", "TIFF")}
    out |= {fmt: encode(rgb, fmt, quality=92) for fmt in ("JPEG", "WEBP", "AVIF", "HEIF")}
    out["JPEG grey"] = encode(g, "JPEG", quality=92)
    out["JPEG CMYK"] = encode(rgb.convert("CMYK"), "JPEG", quality=92)
    out["JPEG progressive"] = encode(rgb, "JPEG", quality=92, progressive=True)
    # 16 bits: clipped to 8 bits instead of scaled, the garment would be a white blob
    out["PNG I;16"] = encode(Image.fromarray(np.asarray(g).astype(np.uint16) * 257), "PNG")
    out["TIFF I;16"] = encode(Image.fromarray(np.asarray(g).astype(np.uint16) * 257), "TIFF")
    # transparency over white: shown as stored, the background would be white
    alpha = Image.fromarray(np.where(np.asarray(g) > 8, 255, 0).astype(np.uint8))
    rgba = Image.merge("RGBA", (*rgb.split(), alpha))
    white_under = Image.composite(rgba, Image.new("RGBA", g.size, (255, 255, 255, 0)), alpha)
    out["PNG RGBA"] = encode(white_under, "PNG")
    out["PNG LA"] = encode(white_under.convert("LA"), "PNG")
    out["WEBP RGBA"] = encode(white_under, "WEBP", lossless=True)
    pal = rgb.quantize(64)
    pal_arr = np.asarray(pal).copy()
    pal_arr[np.asarray(alpha) == 0] = 64  # a palette entry of its own, white, transparent
    palette = [*(pal.getpalette() or [])[: 64 * 3], 255, 255, 255]
    p = Image.fromarray(pal_arr, mode="P")
    p.putpalette(palette)
    out["PNG P transparent"] = encode(p, "PNG", transparency=64)
    out["GIF P transparent"] = encode(p, "GIF", transparency=64)
    # animations: the first frame is the garment, the second another class's
    for fmt in ("GIF", "PNG", "WEBP"):
        out[f"{fmt} animated"] = encode(rgb, fmt, save_all=True, append_images=[second.convert(
            "RGB")], duration=100, loop=0, **({"lossless": True} if fmt == "WEBP" else {}))
    return out


def test_accepted_formats_are_the_documented_ones() -> None:
    assert {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF", "AVIF"} == ALLOWED_FORMATS
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for fmt in ALLOWED_FORMATS:
        assert fmt in readme, fmt


@pytest.mark.slow
@on_module_loop
async def test_every_format_and_mode_gets_the_garments_label(
        shipped: httpx.AsyncClient, fashion: tuple[np.ndarray, np.ndarray]) -> None:
    [(garment, label)] = await garments(fashion, shipped, 1)
    images, labels = fashion
    other = images[np.flatnonzero(labels != label)[0]]
    for name, data in variants(garment, other).items():
        assert await top_label(shipped, data) == label, name


def test_odd_modes_convert_to_the_expected_pixels() -> None:
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # a 64x64 ramp
    spec = InputSpec(size=64, channels=1, mean=[0.5], std=[0.5])

    def pixels(data: bytes) -> np.ndarray:
        return load_input(data, spec)[0].astype(int)

    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    assert np.array_equal(pixels(encode(sixteen, "PNG")), grey)
    # alpha is composited onto black: half-transparent white is mid grey
    white = Image.new("LA", (64, 64), 255)
    white.putalpha(Image.fromarray(grey))
    assert np.abs(pixels(encode(white, "PNG")) - grey).max() <= 1
    cmyk = Image.fromarray(grey).convert("RGB").convert("CMYK")
    assert np.abs(pixels(encode(cmyk, "JPEG", quality=95)) - grey).mean() < 3


# -- limits --------------------------------------------------------------------------------------
def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height and has a few bytes of image data: if the service tried
    to decode it, it would answer 415 (truncated), not 413."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to claim width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 90, 90)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.slow
@on_module_loop
async def test_phone_photos_fit_the_default_limits_and_bombs_do_not(
        shipped: httpx.AsyncClient) -> None:
    defaults = Settings()
    # a 48 MP phone JPEG (8000 x 6000): decoded at 1/8, 0.75 MP
    smooth = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8))
    photo = jpeg_bytes(smooth.resize((8000, 6000), Image.Resampling.BILINEAR), quality=90)
    assert len(photo) < defaults.max_upload_bytes
    r = await shipped.post("/predict", files=[("file", ("big.jpg", photo))])
    assert r.status_code == 200, r.text
    # 64 MP of PNG would be decoded at full size: over the decoded-pixel limit, refused from the
    # header (413, not the 415 a decode of this truncated file would give)
    r = await shipped.post("/predict", files=[("file", ("bomb.png", png_header(8000, 8000)))])
    assert (r.status_code, r.json()["error"]["code"]) == (413, "image_too_large")
    r = await shipped.post("/predict", files=[("file", ("ok.png", png_header(4000, 3000)))])
    assert r.status_code == 415  # the same file within the limits is decoded (and found truncated)
    # a JPEG beyond the header ceiling is refused however small it would decode
    over = jpeg_claiming(20000, 15000)
    assert defaults.max_image_header_pixels < 20000 * 15000
    r = await shipped.post("/predict", files=[("file", ("bomb.jpg", over))])
    assert (r.status_code, r.json()["error"]["code"]) == (413, "image_too_large")
    # a 65535 x 65535 PNG (4.3 G pixels) likewise
    r = await shipped.post("/predict", files=[("file", ("bomb.png", png_header(65535, 65535)))])
    assert (r.status_code, r.json()["error"]["code"]) == (413, "image_too_large")
    assert (await shipped.get("/readyz")).status_code == 200


def test_the_decoded_pixel_limit_counts_what_is_decoded() -> None:
    photo = jpeg_bytes(Image.new("RGB", (4000, 3000), (80, 80, 80)))  # 12 MP -> 500 x 375
    assert len(prepare(photo, GREY28, max_pixels=500 * 375)) == 28 * 28
    progressive = encode(Image.new("RGB", (4000, 3000), (80, 80, 80)), "JPEG", progressive=True)
    with pytest.raises(ValueError, match="decodes to 12000000 pixels"):
        prepare(progressive, GREY28, max_pixels=500 * 375)  # keeps all coefficients in memory
    with pytest.raises(ValueError, match="decodes to 12000000 pixels"):
        prepare(encode(Image.new("L", (4000, 3000)), "PNG"), GREY28, max_pixels=10**7)


# -- resize rules --------------------------------------------------------------------------------
def test_shorter_side_crop_keeps_the_centre_square() -> None:
    """A 300x100 image: the centre 100x100 is kept (the ImageNet rule), stretch squeezes all.
    As with resizing the whole image and then cropping, the filter at the crop's edge still
    reaches a little beyond it."""
    arr = np.zeros((100, 300), np.uint8)
    arr[:, 100:200] = 200  # the centre square is bright, the sides dark
    data = encode(Image.fromarray(arr), "PNG")
    crop = InputSpec(size=20, channels=1, mean=[0.5], std=[0.5], resize="shorter-side-crop")
    stretch = InputSpec(size=20, channels=1, mean=[0.5], std=[0.5])
    cropped = load_input(data, crop)[0]
    assert cropped.shape == (20, 20) and np.all(cropped[:, 1:-1] == 200)
    assert np.all(cropped[:, [0, -1]] > 150)
    squeezed = load_input(data, stretch)[0]
    assert squeezed[:, 0].max() == 0 and squeezed[:, 10].min() == 200
    tall = encode(Image.fromarray(np.ascontiguousarray(arr.T)), "PNG")
    assert np.array_equal(load_input(tall, crop)[0], cropped.T)


# -- the scaled decode ---------------------------------------------------------------------------
@pytest.mark.slow
def test_scaled_decode_agrees_with_the_full_decode(fashion: tuple[np.ndarray, np.ndarray]
                                                   ) -> None:
    """120 test garments as 2016x1512 photo-like JPEGs through the shipped model: the 1/8-scale
    decode and the full decode give the same top-1 accuracy within one image, and the same
    label for at least 98% of them (bench/photos.py --accuracy measures all 10,000)."""
    import torch

    from app.nn import load_model_dir
    from app.nn.tensors import normalize_batch

    loaded = load_model_dir(DEFAULT_MODEL_DIR)
    model, spec = loaded.model.eval(), loaded.card.input
    images, labels = fashion
    n = 120
    scaled, full = [], []
    for k in range(n):
        data = jpeg_bytes(photo_like(images[k], (2016, 1512), seed=k), quality=90)
        scaled.append(load_input(data, spec))
        full.append(load_input(data, spec, scale=False))

    def predict(batch: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            x = normalize_batch(torch.from_numpy(np.stack(batch)), spec)
            return model(x).argmax(1).numpy()

    a, b = predict(scaled), predict(full)
    truth = labels[:n]
    assert abs(int((a == truth).sum()) - int((b == truth).sum())) <= 1
    assert (a == b).mean() >= 0.98
    assert (b == truth).mean() > 0.8  # the photos are still recognisable garments


def test_the_trainer_takes_the_resize_rule_and_loads_files_as_served(tmp_path: Path) -> None:
    from app.training.config import parse_config
    from app.training.data import ImageDataset, scan_image_folder

    assert parse_config(["--resize", "shorter-side-crop"]).resize == "shorter-side-crop"
    assert parse_config([]).resize == "stretch"
    crop = InputSpec(size=28, channels=3, mean=[0.5] * 3, std=[0.5] * 3,
                     resize="shorter-side-crop")
    photo = photo_like(np.full((28, 28), 200, np.uint8), (640, 480), seed=1)
    data = stored_with_orientation(photo, 6, "JPEG", quality=90)  # turned, 1/8-scale decode
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "p.jpg").write_bytes(data)
    split, _ = scan_image_folder(tmp_path)
    pixels, _ = ImageDataset(split, crop)[0]
    assert pixels.numpy().tobytes() == prepare(data, crop, 10**7)
