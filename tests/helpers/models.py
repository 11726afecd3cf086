"""Small random-weight model directories, written by the test that needs one (imports torch)."""

from __future__ import annotations

from pathlib import Path

import torch

from app.model import InputSpec, ModelCard
from app.nn import create_model, save_model_dir

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def make_model_dir(path: Path, preset: str = "fashion-small", seed: int = 0,
                   labels: list[str] | None = None, version: str = "0") -> Path:
    """A model directory of the preset with seeded random weights and random BN statistics (so
    that outputs depend on every layer); no inference graph, so a CPU app exports one at start."""
    torch.manual_seed(seed)
    labels = labels or LABELS
    model = create_model(preset, len(labels), zero_init_last=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    c = model.config
    mean, std = ([0.286], [0.353]) if c.in_channels == 1 else ([0.485, 0.456, 0.406],
                                                               [0.229, 0.224, 0.225])
    card = ModelCard(name=f"test-{preset}", version=version, preset=preset, arch=c.to_dict(),
                     labels=labels, embedding_dim=model.embedding_dim,
                     input=InputSpec(size=c.input_size, channels=c.in_channels, mean=mean,
                                     std=std))
    save_model_dir(model, card, path)
    return path
