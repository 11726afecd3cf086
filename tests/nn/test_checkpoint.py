"""The model directory: round trip, and each refusal with an error that names the problem."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model_dir

from app.model import InputSpec, ModelCard, ModelDirError
from app.nn import create_model, load_model_dir, save_model_dir
from app.nn.checkpoint import CARD_FILE, WEIGHTS_FILE, sha256_file


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "m")


def _edit_card(path: Path, **changes: object) -> None:
    card = json.loads((path / CARD_FILE).read_text())
    card.update(changes)
    (path / CARD_FILE).write_text(json.dumps(card))


@pytest.mark.parametrize("preset", ["fashion-small", "fashion", "resnet50"])
def test_save_load_gives_bit_identical_outputs(tmp_path: Path, preset: str) -> None:
    d = make_model_dir(tmp_path / preset, preset=preset, seed=3)
    a, b = load_model_dir(d), load_model_dir(d)
    cfg = a.model.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
        assert torch.equal(a.model.features(x), b.model.features(x))
    assert a.card.weights_sha256 == sha256_file(d / WEIGHTS_FILE)
    assert a.card.embedding_dim == cfg.embedding_dim
    assert (d / "MODEL_CARD.md").read_text().startswith(f"# {a.card.name}")


def test_loaded_network_equals_the_one_that_was_saved(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = create_model("fashion-small", 3, zero_init_last=False).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    card = ModelCard(name="roundtrip", preset="fashion-small", arch={}, labels=["a", "b", "c"],
                     embedding_dim=1, input=InputSpec(size=28, channels=1, mean=[0.5], std=[0.5]))
    saved = save_model_dir(model, card, tmp_path / "rt")
    loaded = load_model_dir(tmp_path / "rt")
    assert loaded.card.arch == model.config.to_dict() and saved.embedding_dim == 256
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
        assert torch.equal(model.features(x), loaded.model.features(x))


def test_refuses_a_directory_without_a_card(model_dir: Path) -> None:
    (model_dir / CARD_FILE).unlink()
    with pytest.raises(ModelDirError, match="no card.json"):
        load_model_dir(model_dir)


def test_refuses_a_sha256_mismatch(model_dir: Path) -> None:
    _edit_card(model_dir, weights_sha256="0" * 64)
    with pytest.raises(ModelDirError, match="sha256 mismatch"):
        load_model_dir(model_dir)


def test_refuses_an_unknown_preset(model_dir: Path) -> None:
    _edit_card(model_dir, preset="resnet9000")
    with pytest.raises(ModelDirError, match="unknown preset 'resnet9000'"):
        load_model_dir(model_dir)


def test_refuses_a_label_count_that_does_not_fit_the_head(model_dir: Path) -> None:
    card = json.loads((model_dir / CARD_FILE).read_text())
    _edit_card(model_dir, labels=card["labels"][:7])
    with pytest.raises(ModelDirError, match="7 labels but the weights' classifier head has 10"):
        load_model_dir(model_dir)


def test_refuses_weights_that_are_not_safetensors(model_dir: Path) -> None:
    weights = model_dir / WEIGHTS_FILE
    state = {"x": [1, 2, 3]}
    weights.write_bytes(pickle.dumps(state))  # a pickle must never be unpickled
    _edit_card(model_dir, weights_sha256=sha256_file(weights))
    with pytest.raises(ModelDirError, match="not a safetensors file"):
        load_model_dir(model_dir)


def test_refuses_missing_weights_and_a_missing_directory(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_dir(tmp_path / "nowhere")
    (model_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelDirError, match="weights file is missing"):
        load_model_dir(model_dir)


def test_refuses_a_malformed_card(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / CARD_FILE).write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        load_model_dir(broken)
    _edit_card(model_dir, input={"size": 28, "channels": 1, "mean": [0.1, 0.2], "std": [1.0]})
    with pytest.raises(ModelDirError, match="one value per input channel"):
        load_model_dir(model_dir)
