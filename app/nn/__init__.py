"""The network (claims 1-5) and its torch-side tools: presets, tensors, model-directory I/O,
graph export and quantisation. Everything here may import torch; the torch-free parts the CPU
serving process reads (the card, the model directory's checks, image decoding) live in
``app.model``. Nothing here imports training, serving or api (pyproject's import contract)."""

from app.nn.checkpoint import LoadedModel, load_model_dir, save_model_dir
from app.nn.resnet import PRESETS, PatentResNet, ResNetConfig, create_model

__all__ = [
    "PRESETS",
    "LoadedModel",
    "PatentResNet",
    "ResNetConfig",
    "create_model",
    "load_model_dir",
    "save_model_dir",
]
