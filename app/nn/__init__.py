"""The network (claims 1-5), its presets, its preprocessing and the model directory.

Torch lives here; nothing in this package imports FastAPI.
"""

from app.nn.card import InputSpec, ModelCard
from app.nn.checkpoint import LoadedModel, ModelDirError, load_model_dir, save_model_dir
from app.nn.resnet import PRESETS, PatentResNet, ResNetConfig, create_model

__all__ = [
    "PRESETS",
    "InputSpec",
    "LoadedModel",
    "ModelCard",
    "ModelDirError",
    "PatentResNet",
    "ResNetConfig",
    "create_model",
    "load_model_dir",
    "save_model_dir",
]
