"""One typed training config: defaults suit Fashion-MNIST on a 2-core CPU; saved into the card."""

from __future__ import annotations

import argparse
import json
import tomllib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.model.card import ResizeRule


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # data
    data: str = Field("fashion-mnist", description="'fashion-mnist' (Debian IDX files, found "
                      "automatically), a directory of IDX files, or an ImageFolder root")
    data_test: str | None = Field(None, description="ImageFolder test root (default: DATA/test "
                                  "when DATA has train/ and test/ subfolders)")
    val_fraction: float = Field(1 / 12, gt=0, lt=0.5, description="held out of training data")
    limit_train: int = Field(0, ge=0, description="use only this many training images (0 = all)")
    limit_test: int = Field(0, ge=0, description="use only this many test images (0 = all)")
    input_size: int = Field(0, ge=0, description="input side in pixels (0 = the preset's)")
    resize: ResizeRule = Field(
        "stretch", description="how an image becomes size x size, written into the card and "
        "served the same way: stretch the whole image, or scale the shorter side and keep the "
        "centre square (the ImageNet convention, for real photos)")
    # network
    preset: str = "fashion"
    arch: dict[str, Any] = Field(default_factory=dict, description="ResNetConfig overrides")
    name: str = Field("", description="model name in the card (default: output dir name)")
    # optimisation
    epochs: int = Field(30, ge=1, description="max epochs (convergence may stop earlier)")
    batch_size: int = Field(128, ge=1, description="per process")
    lr: float = Field(0.1, gt=0, description="peak learning rate at batch 128 (scaled linearly)")
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    weight_decay: float = Field(5e-4, ge=0, description="on conv/linear weights")
    bn_reg: float = Field(5e-5, ge=0, description="coefficient of mean(gamma^2, beta^2) (claim 9)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # augmentation (claims 10-12); ranges are [low, high]
    crop_area: tuple[float, float] = (0.65, 1.0)
    crop_aspect: tuple[float, float] = (0.8, 1.25)
    flip_p: float = Field(0.5, ge=0, le=1)
    rotate_p: float = Field(0.25, ge=0, le=1)
    rotate_deg: tuple[float, float] = (-12.0, 12.0)
    color_p: float = Field(0.3, ge=0, le=1)
    brightness: float = Field(0.2, ge=0, description="factor drawn from [1-b, 1+b]")
    contrast: float = Field(0.2, ge=0)
    saturation: float = Field(0.2, ge=0, description="RGB only")
    erase_p: float = Field(0.25, ge=0, le=1, description="random erasing after the claims' steps")
    # convergence (claim 6)
    patience: int = Field(6, ge=1, description="evaluations without relative improvement")
    rel_tol: float = Field(1e-3, ge=0, description="relative val-loss improvement that counts")
    # runtime
    seed: int = 0
    workers: int = Field(1, ge=0, description="DataLoader worker processes per rank")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0 = leave as is)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    amp: Literal["auto", "bf16", "off"] = "auto"
    out: str = Field("runs/model", description="model directory to write")
    state: str = Field("", description="training-state file (default: OUT.train-state.pt)")
    resume: bool = False
    init_from: str | None = Field(None, description="start from this model directory's weights "
                                  "(fine-tuning; same preset, architecture and labels)")
    progress: bool = True
    calibrate: bool = Field(False, description="then run imgrec calibrate on the directory "
                            "(temperature, unknown threshold, class-map baseline, measured)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name in ("crop_area", "crop_aspect", "rotate_deg"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: low {lo} is above high {hi}")
        if not 0 < self.crop_area[0] <= self.crop_area[1] <= 1:
            raise ValueError("crop_area must lie in (0, 1]")
        if self.crop_aspect[0] <= 0:
            raise ValueError("crop_aspect must be positive")
        # claim 8: the BN coefficient is an order of magnitude below the weight decay
        if self.bn_reg > 0 and self.bn_reg * 10 > self.weight_decay:
            raise ValueError(
                f"bn_reg {self.bn_reg:g} must be at least ten times smaller than weight_decay "
                f"{self.weight_decay:g} (claim 8)"
            )
        return self

    @property
    def state_path(self) -> Path:
        return Path(self.state) if self.state else Path(f"{self.out.rstrip('/')}.train-state.pt")


def _scalar_type(annotation: Any) -> Any:
    """The argparse type of a field: Optional[X] -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def build_parser(prog: str = "imgrec train") -> argparse.ArgumentParser:
    """Flags generated from the config's fields, so the two never drift apart."""
    p = argparse.ArgumentParser(prog=prog, description="Train the patent's ResNet (claims 6-12).",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="JSON or TOML file of config values (flags override it)")
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = f"{field.description or ''} (default: {field.default!r})".strip()
        typ = _scalar_type(field.annotation)
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        elif get_origin(typ) is tuple:
            p.add_argument(flag, type=float, nargs=2, metavar=("LOW", "HIGH"), help=help_)
        elif get_origin(typ) is Literal:
            p.add_argument(flag, choices=get_args(typ), help=help_)
        elif get_origin(typ) is dict or typ is dict:
            p.add_argument(flag, type=json.loads, help=help_ + " as JSON")
        else:
            p.add_argument(flag, type=typ, help=help_)
    return p


def parse_config(argv: list[str] | None) -> TrainConfig:
    ns = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if cfg_file := ns.pop("config", None):
        path = Path(cfg_file)
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    values.update(ns)
    return TrainConfig.model_validate(values)
