"""app/nn/quantize.py takes arrays: its images reach the card's input size by app.model.decode,
the pixels the server computes for the same image uploaded (before, it encoded each image as a
PNG and sent it through the server's upload path; it no longer imports serving)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.model.card import InputSpec
from app.nn.quantize import as_input
from app.serving.upload_checks import prepare


def served_pixels(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """What the old path computed: each image as a lossless PNG upload through the server's
    prepare, with its pixel limit off."""
    out = []
    for image in images:
        buf = io.BytesIO()
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
        out.append(np.frombuffer(prepare(buf.getvalue(), spec, 1 << 62), np.uint8)
                   .reshape(spec.channels, spec.size, spec.size))
    return np.stack(out)


@pytest.mark.parametrize(("shape", "channels", "resize"), [
    ((1, 40, 36), 1, "stretch"),          # grey, larger, not square
    ((1, 20, 20), 1, "shorter-side-crop"),  # grey, smaller
    ((3, 50, 30), 3, "shorter-side-crop"),  # RGB at an RGB model
    ((3, 28, 28), 1, "stretch"),          # RGB at a grey model: colour conversion only
    ((1, 28, 28), 3, "stretch"),          # grey at an RGB model
])
def test_quantize_prepares_arrays_exactly_as_the_server_prepares_uploads(
        shape: tuple[int, int, int], channels: int, resize: str) -> None:
    rng = np.random.default_rng(sum(shape) + channels)
    images = rng.integers(0, 256, (5, *shape), dtype=np.uint8)
    mean, std = [0.5] * channels, [0.25] * channels
    spec = InputSpec(size=28, channels=channels, mean=mean, std=std, resize=resize)
    got = as_input(images, spec)
    assert got.dtype == np.uint8 and got.shape == (5, channels, 28, 28)
    np.testing.assert_array_equal(got, served_pixels(images, spec))


def test_arrays_already_at_the_input_size_pass_unchanged() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    spec = InputSpec(size=28, channels=1, mean=[0.5], std=[0.25])
    np.testing.assert_array_equal(as_input(images, spec), images)
