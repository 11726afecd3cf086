"""`imgrec quantize`'s data side (app/training/quantize_cli.py): image files become the pixels
the server computes for the same bytes uploaded, through app.model.decode (before, through the
server's own upload path, which app.nn may not import)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.model.card import InputSpec
from app.serving.upload_checks import prepare
from app.training.data import DataError, Split
from app.training.quantize_cli import prepared_file, split_arrays


def image_files(root: Path) -> list[Path]:
    """A few files of the kinds a catalogue holds: a large JPEG (decoded scaled in the DCT
    domain), a JPEG with an EXIF orientation, an RGBA PNG, a palette GIF, a 16-bit PNG."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(name: str, im: Image.Image, **kw: object) -> None:
        buf = io.BytesIO()
        im.save(buf, **kw)
        (root / name).write_bytes(buf.getvalue())
        paths.append(root / name)

    photo = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))
    save("big.jpg", photo, format="JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turned 90 degrees
    save("turned.jpg", photo.resize((160, 90)), format="JPEG", exif=exif.tobytes())
    save("alpha.png", Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8)),
         format="PNG")
    save("palette.gif", photo.resize((64, 40)).convert("P"), format="GIF")
    save("deep.png", Image.fromarray(rng.integers(0, 65536, (30, 30), dtype=np.uint16)),
         format="PNG")
    return paths


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resize", ["stretch", "shorter-side-crop"])
def test_files_are_prepared_exactly_as_the_server_prepares_uploads(
        tmp_path: Path, channels: int, resize: str) -> None:
    spec = InputSpec(size=28, channels=channels, mean=[0.5] * channels, std=[0.25] * channels,
                     resize=resize)
    paths = image_files(tmp_path)
    for path in paths:
        served = np.frombuffer(prepare(path.read_bytes(), spec, 1 << 62), np.uint8)
        np.testing.assert_array_equal(prepared_file(path, spec).ravel(), served,
                                      err_msg=path.name)
    split = Split(labels=torch.zeros(len(paths), dtype=torch.int64), paths=paths)
    arrays = split_arrays(split, spec)
    assert arrays.shape == (len(paths), channels, 28, 28) and arrays.dtype == np.uint8


def test_an_undecodable_file_names_itself(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="broken.png"):
        prepared_file(bad, InputSpec(size=28, channels=1, mean=[0.5], std=[0.25]))
