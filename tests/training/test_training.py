"""The trainer (claims 6-12): augmentation statistics, loss terms, convergence, real runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import needs_data
from PIL import Image

from app.nn import create_model, load_model_dir
from app.nn.checkpoint import CARD_FILE
from app.training.augment import build_train_transform, crop_geometry, crop_resize, rotation
from app.training.config import TrainConfig, parse_config
from app.training.convergence import Convergence
from app.training.loss import PatentLoss, bn_regulariser, weight_decay_term

N = 4000  # draws per statistical check; 4 sigma of a proportion is at most 4*0.5/sqrt(N)=0.032
TOL = 4 * 0.5 / math.sqrt(N)


def quiet_config(**kw: object) -> TrainConfig:
    base: dict[str, object] = {"flip_p": 0.0, "rotate_p": 0.0, "color_p": 0.0, "erase_p": 0.0,
                               "crop_area": (1.0, 1.0), "crop_aspect": (1.0, 1.0)}
    base.update(kw)
    return TrainConfig.model_validate(base)


# -- augmentation (claims 10-12) -------------------------------------------------------------
def test_crop_draws_area_and_aspect_from_the_configured_ranges() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(crop_area=(0.3, 0.9), crop_aspect=(0.75, 1.33))
    crop = crop_resize(cfg, 28)
    image = torch.zeros(1, 400, 400, dtype=torch.uint8)
    draws = [crop_geometry(crop.make_params([image]), 400, 400) for _ in range(N)]
    areas = np.array([a for a, _ in draws])
    aspects = np.array([r for _, r in draws])
    assert areas.min() >= 0.3 - 0.01 and areas.max() <= 0.9 + 0.01
    assert aspects.min() >= 0.75 - 0.01 and aspects.max() <= 1.33 + 0.01
    # the draws cover the ranges (uniform area): each third of the range is used
    assert all(np.mean((areas >= lo) & (areas < lo + 0.2)) > 0.25 for lo in (0.3, 0.5, 0.7))
    out = build_train_transform(cfg, 28, 1)(image)
    assert out.shape == (1, 28, 28) and out.dtype == torch.uint8  # resized to the set size


def test_flip_happens_with_p1() -> None:
    torch.manual_seed(1)
    t = build_train_transform(quiet_config(flip_p=0.3), 28, 1)
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[..., :14] = 255
    flipped = sum(int(t(image)[0, 0, 0] == 0) for _ in range(N))
    assert abs(flipped / N - 0.3) < TOL


def test_rotation_happens_with_p2_by_an_angle_in_range() -> None:
    torch.manual_seed(2)
    cfg = quiet_config(rotate_p=0.4, rotate_deg=(-30.0, 10.0))
    angles = np.array([rotation(cfg).make_params([])["angle"] for _ in range(N)])
    assert angles.min() >= -30 and angles.max() <= 10
    assert abs(np.mean(angles < -10) - 0.5) < TOL  # uniform over [-30, 10]
    t = build_train_transform(cfg, 28, 1)
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[:, 2:8, 10:26] = 255
    changed = sum(int(not torch.equal(t(image), image)) for _ in range(N))
    assert abs(changed / N - 0.4) < TOL


def test_colour_adjusted_with_p3() -> None:
    torch.manual_seed(3)
    t = build_train_transform(quiet_config(color_p=0.25, brightness=0.5, contrast=0.0), 28, 1)
    image = torch.full((1, 28, 28), 200, dtype=torch.uint8)
    changed = sum(int(not torch.equal(t(image), image)) for _ in range(N))
    assert abs(changed / N - 0.25) < TOL


# -- loss (claims 7-9) -------------------------------------------------------------------------
def test_bn_term_equals_a_hand_computation() -> None:
    torch.manual_seed(4)
    model = create_model("fashion-small", 10)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.5, 0.5)
    squares, count = 0.0, 0
    for m in bns:
        for p in (m.weight, m.bias):
            squares += sum(float(v) ** 2 for v in p.detach().flatten())
            count += p.numel()
    assert math.isclose(bn_regulariser(model).item(), squares / count, rel_tol=1e-5)
    loss = PatentLoss(weight_decay=1e-3, bn_coef=1e-4)
    logits = torch.randn(4, 10)
    target = torch.tensor([0, 1, 2, 3])
    terms = loss(model, logits, target)
    assert math.isclose(terms.bn.item(), 1e-4 * squares / count, rel_tol=1e-5)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    wd = 0.5 * sum(float((w.detach() ** 2).sum()) for w in convs)
    assert math.isclose(terms.weight_decay.item(), 1e-3 * wd, rel_tol=1e-5)
    assert math.isclose(float(weight_decay_term(model)), wd, rel_tol=1e-5)
    ce = float(torch.nn.functional.cross_entropy(logits, target))
    expected = ce + 1e-3 * wd + 1e-4 * squares / count
    assert math.isclose(terms.total.item(), expected, rel_tol=1e-5)


def test_bn_coefficient_must_be_ten_times_below_weight_decay() -> None:
    with pytest.raises(ValueError, match="ten times smaller"):
        TrainConfig(weight_decay=5e-4, bn_reg=1e-4)
    with pytest.raises(ValueError, match="ten times"):
        PatentLoss(weight_decay=5e-4, bn_coef=1e-4)
    assert TrainConfig(weight_decay=5e-4, bn_reg=5e-5).bn_reg == 5e-5
    with pytest.raises(ValueError, match="ten times smaller"):
        parse_config(["--weight-decay", "1e-4", "--bn-reg", "1e-4"])


def test_config_file_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('epochs = 3\ncrop_area = [0.5, 1.0]\npreset = "fashion-small"\n')
    cfg = parse_config(["--config", str(f), "--epochs", "4", "--no-progress"])
    assert cfg.epochs == 4 and cfg.crop_area == (0.5, 1.0) and cfg.preset == "fashion-small"
    assert cfg.progress is False


# -- convergence (claim 6) ---------------------------------------------------------------------
def test_convergence_stops_on_a_plateau_and_keeps_the_best() -> None:
    c = Convergence(patience=3, rel_tol=0.01, max_epochs=100)
    losses = [1.0, 0.8, 0.7, 0.699, 0.698, 0.75]  # the last three improve by < 1 %
    flags = [c.update(i, v) for i, v in enumerate(losses)]
    assert flags == [True, True, True, False, False, False]
    assert c.done and "plateau" in (c.reason or "")
    assert c.best == 0.7 and c.best_epoch == 2
    m = Convergence(patience=3, rel_tol=0.01, max_epochs=2)
    m.update(0, 1.0)
    assert not m.done
    m.update(1, 0.5)
    assert m.done and "max epochs" in (m.reason or "")


# -- real runs -----------------------------------------------------------------------------------
def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env,
                          check=False)


@pytest.mark.slow
@needs_data
def test_tiny_training_run_writes_a_loadable_model_directory(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    r = run_cli(sys.executable, "-m", "app.training", "--preset", "fashion-small",
                "--limit-train", "384", "--limit-test", "200", "--epochs", "2",
                "--batch-size", "64", "--workers", "0", "--no-progress", "--threads", "1",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = load_model_dir(out)
    card = loaded.card
    assert card.labels[0] == "T-shirt/top" and card.input.size == 28
    assert card.metrics["test_images"] == 200 and len(card.metrics["confusion_matrix"]) == 10
    assert set(card.metrics["per_class_accuracy"]) == set(card.labels)
    assert card.training["command"].startswith("imgrec train") or "app.training" in \
        card.training["command"]
    assert card.training["config"]["epochs"] == 2 and card.data["fingerprint"]["sha256"]
    for name in ("curves.png", "confusion.png", "MODEL_CARD.md", "train_log.jsonl", "model.onnx"):
        assert (out / name).is_file(), name
    # the trainer writes the inference graph the CPU server runs, recorded in the card
    assert card.graphs["float32"].weights_sha256 == card.weights_sha256
    assert Image.open(out / "curves.png").size[0] > 300
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    epochs = [x for x in log if x["event"] == "epoch"]
    assert len(epochs) == 2
    assert all(k in epochs[0] for k in ("train_loss", "train_weight_decay", "train_bn_reg"))
    # the training state is kept apart from the published weights, and loads without pickle
    state = torch.load(Path(f"{out}.train-state.pt"), weights_only=True)
    assert state["epoch"] == 1
    # resume continues from the saved epoch
    r = run_cli(sys.executable, "-m", "app.training", "--preset", "fashion-small",
                "--limit-train", "384", "--limit-test", "200", "--epochs", "3",
                "--batch-size", "64", "--workers", "0", "--no-progress", "--threads", "1",
                "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stderr and "epoch 3:" in r.stderr and "epoch 1:" not in r.stderr
    # fine-tuning from the model directory records its lineage
    tuned = tmp_path / "tuned"
    r = run_cli(sys.executable, "-m", "app.training", "--preset", "fashion-small",
                "--limit-train", "128", "--limit-test", "64", "--epochs", "1", "--lr", "0.01",
                "--batch-size", "64", "--workers", "0", "--no-progress", "--threads", "1",
                "--init-from", str(out), "--out", str(tuned))
    assert r.returncode == 0, r.stderr[-3000:]
    lineage = load_model_dir(tuned).card.training["init_from"]
    assert lineage["weights_sha256"] == load_model_dir(out).card.weights_sha256
    # evaluate: the last line of stdout is JSON with top1 and n, matching the card
    ev = run_cli(sys.executable, "-m", "app.cli", "evaluate", str(out), "--limit", "200")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["n"] == 200
    assert abs(result["top1"] - load_model_dir(out).card.metrics["test_top1"]) < 0.05


@pytest.mark.slow
def test_image_folder_training(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for cls, value in (("dark", 40), ("light", 220)):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                arr = np.clip(rng.normal(value, 10, (20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    out = tmp_path / "folder-model"
    r = run_cli(sys.executable, "-m", "app.training", "--data", str(tmp_path / "data"),
                "--preset", "fashion-small", "--arch", '{"in_channels": 3}', "--epochs", "2",
                "--batch-size", "16", "--workers", "0", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    card = load_model_dir(out).card
    assert card.labels == ["dark", "light"] and card.input.channels == 3
    assert card.metrics["test_images"] == 16


@pytest.mark.slow
@needs_data
def test_torchrun_two_cpu_processes_keep_identical_weights(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    r = run_cli(str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "app.training",
                "--preset", "fashion-small", "--limit-train", "512", "--limit-test", "128",
                "--epochs", "2", "--batch-size", "32", "--workers", "0", "--no-progress",
                "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    card = json.loads((out / CARD_FILE).read_text())
    digests = card["training"]["rank_state_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert card["training"]["hardware"]["world_size"] == 2
    assert card["training"]["command"].startswith("torchrun --nproc_per_node 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ddp.train-state.pt"]
    load_model_dir(out)
