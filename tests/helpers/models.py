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


def calibrate_tiny(directory: Path, images: int = 300, seed: int = 0) -> Path:
    """``imgrec calibrate``'s fit and write on a tiny model, with seeded random pictures and
    labels for its splits (no data set needed): the card and calibration.safetensors as the
    command leaves them, in a second or two."""
    import numpy as np

    from app.model.directory import open_model_dir
    from app.training.calibrate import calibrate, write

    root, card = open_model_dir(directory)
    rng = np.random.default_rng(seed)
    shape = (images, card.input.channels, card.input.size, card.input.size)

    def split() -> tuple[np.ndarray, np.ndarray]:
        # pictures with structure (a bright block somewhere), not only noise
        x = (rng.random(shape) * 60).astype(np.uint8)
        for i in range(images):
            r, c = rng.integers(0, card.input.size // 2, 2)
            x[i, :, r:r + 12, c:c + 12] = 200
        return x, rng.integers(0, card.num_classes, images)

    splits = {"fit": split(), "val": split(), "test": split()}
    spec, tensors, data = calibrate(root, card, splits, 0.95, 1, True, measure=False)
    write(root, card, spec.model_copy(update={"command": "tests/helpers/models.calibrate_tiny"}),
          tensors, data)
    return root
