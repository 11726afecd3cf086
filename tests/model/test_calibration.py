"""The card's calibration and its tensors, read without torch: the safetensors format written by
numpy and read by the safetensors package (and back), the operating-point table, the
directory's checks of calibration.safetensors, and the class map geometry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from app.model import tensorfile
from app.model.calibration import CALIBRATION_FILE, OodScorer
from app.model.cam import input_map, total_stride, upsample
from app.model.directory import ModelDirError, calibration_tensors, read_card


def test_tensorfile_round_trips_with_the_safetensors_package() -> None:
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b": np.arange(7, dtype=np.int64), "c": rng.standard_normal(4)}
    ours = tensorfile.encode(tensors, {"what": "test"})
    theirs = st_load(ours)
    assert set(theirs) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(theirs[k], v)
    back = tensorfile.decode(st_save(tensors))
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("blob", [b"", b"\xff" * 8 + b"{}", b"\x02\0\0\0\0\0\0\0{x",
                                  tensorfile.encode({"a": np.zeros(4, np.float32)})[:-1]])
def test_tensorfile_refuses_what_is_not_one(blob: bytes) -> None:
    with pytest.raises(tensorfile.TensorFileError):
        tensorfile.decode(blob)


def test_the_card_holds_the_calibration_and_its_file_is_verified(
        calibrated_model_dir: Path, tmp_path: Path) -> None:
    card = read_card(calibrated_model_dir)
    cal = card.calibration
    assert cal is not None and cal.weights_sha256 == card.weights_sha256
    assert cal.temperature > 0 and cal.ood.known_fraction == 0.95
    assert cal.ood.threshold == pytest.approx(cal.ood.threshold_at(0.95))
    assert cal.ood.threshold_at(0.5) < cal.ood.threshold < cal.ood.threshold_at(1.0)
    with pytest.raises(ValueError, match="outside"):
        cal.ood.threshold_at(0.2)
    tensors = calibration_tensors(calibrated_model_dir, card)
    assert tensors is not None
    assert tensors["class_means"].shape == (card.num_classes, card.embedding_dim)
    assert tensors["cam_baseline"].shape[0] == card.num_classes
    # the markdown card says it, with the command
    readme = (calibrated_model_dir / "MODEL_CARD.md").read_text()
    assert "## Calibrated scores and unknown pictures" in readme and "calibrate_tiny" in readme

    # a changed byte, a missing file, other weights: refused, naming the file
    broken = Path(shutil.copytree(calibrated_model_dir, tmp_path / "broken"))
    path = broken / CALIBRATION_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="sha256 mismatch"):
        calibration_tensors(broken, card)
    path.unlink()
    with pytest.raises(ModelDirError, match="missing"):
        calibration_tensors(broken, card)
    other = card.model_copy(update={"calibration": cal.model_copy(
        update={"weights_sha256": "0" * 64})})
    with pytest.raises(ModelDirError, match="fitted for weights"):
        calibration_tensors(calibrated_model_dir, other)


def test_an_old_card_without_calibration_reads_as_none(served_model_dir: Path) -> None:
    raw = json.loads((served_model_dir / "card.json").read_text())
    assert "calibration" not in raw or raw["calibration"] is None
    card = read_card(served_model_dir)
    assert card.calibration is None and calibration_tensors(served_model_dir, card) is None


def test_mahalanobis_scorer_is_the_textbook_distance() -> None:
    rng = np.random.default_rng(1)
    means = rng.standard_normal((3, 4)).astype(np.float32)
    a = rng.standard_normal((4, 4))
    precision = (a @ a.T + 4 * np.eye(4)).astype(np.float32)
    f = rng.standard_normal((6, 4)).astype(np.float32)
    want = np.array([min((x - m) @ precision @ (x - m) for m in means) for x in f])
    np.testing.assert_allclose(OodScorer(means, precision)(f), want, rtol=1e-4)


def test_a_cell_sits_on_pixel_stride_times_its_index() -> None:
    # the shipped model's geometry: 28 px, stride 8, a 4 x 4 map centred on pixels 0, 8, 16, 24
    assert total_stride({"stem_stride": 1, "strides": [2, 2, 2]}) == 8
    cells = np.zeros((4, 4), np.float32)
    cells[1, 2] = 1.0  # row 1 (y), column 2 (x)
    up = upsample(cells, 28, 8)
    assert up.shape == (28, 28) and np.unravel_index(up.argmax(), up.shape) == (8, 16)
    assert up[8, 16] == 1.0 and up[8, 12] == pytest.approx(0.5) and up[0, 0] == 0.0
    maps = np.stack([cells, -cells])
    m = input_map(maps, 1, 28, 8, baseline=np.stack([cells, -2 * cells]))
    assert m.min() == 0.0 and m.max() == 1.0 and m[8, 16] == 1.0  # -c - (-2c) = +c
