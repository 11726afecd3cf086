"""The network (claims 1-5), its presets, its preprocessing and the model directory.

Torch lives here; nothing in this package imports FastAPI. The package itself imports nothing
heavy: ``app.nn.card`` and ``app.nn.modeldir`` are torch-free and are what the CPU serving
process reads, so the names that need torch load only when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from app.nn.card import InputSpec, ModelCard
from app.nn.modeldir import ModelDirError

if TYPE_CHECKING:
    from app.nn.checkpoint import LoadedModel, load_model_dir, save_model_dir
    from app.nn.resnet import PRESETS, PatentResNet, ResNetConfig, create_model

_LAZY = {
    "LoadedModel": "app.nn.checkpoint", "load_model_dir": "app.nn.checkpoint",
    "save_model_dir": "app.nn.checkpoint", "PRESETS": "app.nn.resnet",
    "PatentResNet": "app.nn.resnet", "ResNetConfig": "app.nn.resnet",
    "create_model": "app.nn.resnet",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'app.nn' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


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
