"""The patent's residual network (claims 1-5) as one module configured by presets.

How the claims map onto the modules of :class:`PatentResNet`:

* ``stem`` -- claim 2: the initial convolutional layer, the only thing before the blocks; its
  output is the input of the first residual block.
* ``stages[i][j]`` -- a :class:`Bottleneck`, one residual block of claim 1:
    - ``branch`` is the convolution branch (claims 1, 4, 5):
      ``bn1-relu-conv1`` (1x1, stride 1) -> ``bn2-relu-conv2`` (3x3, stride s)
      -> ``bn3-relu-conv3`` (1x1, stride 1). Kernel 1 < kernel 2 and stride 1 < stride 2 < width
      of kernel 2 (claim 1): the downsampling stride sits on the 3x3 convolution only. A batch
      normalisation precedes each of the three convolutions (claim 5).
    - ``shortcut`` is the residual branch: in the first block of every stage a
      :class:`ProjectionShortcut` -- its own BN, ReLU and a 1x1 "target" convolution with the
      stage's stride (claim 3); in the other blocks the identity.
* ``head_norm`` -- the final BN-ReLU of a pre-activation network; global average pooling of its
  output is the feature vector (``features``), the image feature information of claim 1.
* ``fc`` -- the recognition processing of claim 1: a linear classifier (``head``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ResNetConfig:
    """Architecture arguments; presets are named instances of this, overrides replace fields."""

    in_channels: int = 3
    input_size: int = 224
    stem_channels: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    depths: tuple[int, ...] = (3, 4, 6, 3)
    widths: tuple[int, ...] = (64, 128, 256, 512)  # bottleneck (3x3) widths per stage
    strides: tuple[int, ...] = (2, 2, 2, 2)  # on each stage's first 3x3 conv and its shortcut
    expansion: int = 4  # block output width = width * expansion
    zero_init_last: bool = True  # start each residual branch at zero: identity blocks at init

    def __post_init__(self) -> None:
        if not (len(self.depths) == len(self.widths) == len(self.strides)) or not self.depths:
            raise ValueError("depths, widths and strides need one entry per stage")
        if any(d < 1 for d in self.depths) or any(w < 1 for w in self.widths):
            raise ValueError("every stage needs at least one block and a positive width")
        if any(s not in (1, 2) for s in self.strides):
            # claim 1: stride of the 3x3 must be below its kernel width (3)
            raise ValueError("stage strides must be 1 or 2 (below the 3x3 kernel width)")

    @property
    def embedding_dim(self) -> int:
        return self.widths[-1] * self.expansion

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ResNetConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown architecture arguments: {sorted(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in args.items()}
        return cls(**values)


PRESETS: dict[str, ResNetConfig] = {
    # 28x28 grey images (Fashion-MNIST). 0.87M parameters, ~57 MFLOP per image; the size that a
    # 2-core CPU trains past 94% in about an hour (measured here).
    "fashion": ResNetConfig(
        in_channels=1,
        input_size=28,
        stem_channels=32,
        stem_kernel=3,
        stem_stride=1,
        depths=(2, 2, 2),
        widths=(32, 64, 128),
        strides=(2, 2, 2),
    ),
    # A smaller sibling for tests and quick experiments on 28x28 grey images.
    "fashion-small": ResNetConfig(
        in_channels=1,
        input_size=28,
        stem_channels=16,
        stem_kernel=3,
        stem_stride=1,
        depths=(1, 1, 1),
        widths=(16, 32, 64),
        strides=(2, 2, 2),
    ),
    # The patent's own project: 7x7/2 stem, no max-pool, every stage's first block strided.
    "resnet50": ResNetConfig(depths=(3, 4, 6, 3)),
    "resnet101": ResNetConfig(depths=(3, 4, 23, 3)),
}


def preset_config(preset: str, **overrides: Any) -> ResNetConfig:
    try:
        base = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}") from None
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    unknown = set(overrides) - set(ResNetConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown architecture arguments: {sorted(unknown)}")
    return replace(base, **overrides)


class BNReLU(nn.Sequential):
    """Batch normalisation then ReLU: the pre-activation in front of a convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class ProjectionShortcut(nn.Module):
    """Claim 3: the residual branch of a stage's first block -- BN, ReLU, 1x1 target conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.norm = BNReLU(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x))


class Bottleneck(nn.Module):
    """One residual block: pre-activation bottleneck, stride on the 3x3 (claims 1, 4, 5)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int,
                 project: bool) -> None:
        super().__init__()
        self.branch = nn.Sequential()
        self.branch.add_module("bn1", BNReLU(in_channels))
        self.branch.add_module("conv1", nn.Conv2d(in_channels, width, 1, stride=1, bias=False))
        self.branch.add_module("bn2", BNReLU(width))
        self.branch.add_module(
            "conv2", nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        )
        self.branch.add_module("bn3", BNReLU(width))
        self.branch.add_module("conv3", nn.Conv2d(width, out_channels, 1, stride=1, bias=False))
        self.shortcut: nn.Module = (
            ProjectionShortcut(in_channels, out_channels, stride) if project else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x) + self.shortcut(x)


class PatentResNet(nn.Module):
    """Stem -> stages of bottleneck blocks -> BN-ReLU -> global average pool -> linear."""

    def __init__(self, config: ResNetConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be positive")
        self.config = config
        self.num_classes = num_classes
        c = config
        self.stem = nn.Conv2d(
            c.in_channels, c.stem_channels, c.stem_kernel, stride=c.stem_stride,
            padding=c.stem_kernel // 2, bias=False,
        )
        stages: list[nn.Module] = []
        in_ch = c.stem_channels
        for depth, width, stride in zip(c.depths, c.widths, c.strides, strict=True):
            out_ch = width * c.expansion
            blocks = [Bottleneck(in_ch, width, out_ch, stride, project=True)]
            blocks += [Bottleneck(out_ch, width, out_ch, 1, project=False)
                       for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.head_norm = BNReLU(in_ch)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.embedding_dim = in_ch
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_last:
            # Each block starts as (almost) its shortcut: the "zero-gamma" trick of Goyal et al.,
            # applied to the last conv because a pre-activation branch ends in a conv, not a BN.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(cast(nn.Conv2d, m.branch.conv3).weight)

    def feature_map(self, x: Tensor) -> Tensor:
        """The final BN-ReLU's output before the pool, shape (N, embedding_dim, h, w)."""
        return self.head_norm(self.stages(self.stem(x)))

    def features(self, x: Tensor) -> Tensor:
        """The embedding: pooled output of the final BN-ReLU, shape (N, embedding_dim)."""
        return self.pool_features(self.feature_map(x))

    def pool_features(self, fmap: Tensor) -> Tensor:
        return torch.flatten(self.pool(fmap), 1)

    def class_maps(self, fmap: Tensor) -> Tensor:
        """The logits at every cell of the feature map, (N, classes, h, w): the class
        activation maps of Zhou et al.; their mean over the cells is exactly the logits (the
        head is a linear layer after an average pool)."""
        return torch.einsum("nchw,kc->nkhw", fmap, self.fc.weight) + self.fc.bias.view(1, -1, 1, 1)

    def head(self, features: Tensor) -> Tensor:
        """Classifier logits from features, shape (N, num_classes)."""
        return self.fc(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def create_model(preset: str, num_classes: int, **overrides: Any) -> PatentResNet:
    """Build the network of a preset (``fashion``, ``resnet50``, ...) with optional overrides."""
    return PatentResNet(preset_config(preset, **overrides), num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bn_parameters(model: nn.Module) -> Sequence[Tensor]:
    """The learnable gamma/beta of every batch normalisation layer (claim 7)."""
    params: list[Tensor] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params += [p for p in (m.weight, m.bias) if p is not None]
    return params
