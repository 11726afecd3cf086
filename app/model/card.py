"""The model card: everything needed to rebuild, feed and judge a network, stored as card.json."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.model.calibration import CalibrationSpec

CARD_SCHEMA_VERSION = 1

# how an image is brought to the input size (app.model.decode applies it): "stretch", the whole
# image to size x size; "shorter-side-crop" (the ImageNet convention), the shorter side to size
# and the centre square kept
ResizeRule = Literal["stretch", "shorter-side-crop"]


class InputSpec(BaseModel):
    """How an image becomes the network's input tensor (serving applies exactly this)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(gt=0, description="square input side in pixels")
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    resize: ResizeRule = "stretch"
    interpolation: Literal["bilinear"] = "bilinear"

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per input channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class GraphSpec(BaseModel):
    """An inference graph in the model directory (ONNX): what serving runs without PyTorch.

    ``weights_sha256`` names the weights it was exported from; serving refuses a graph whose
    weights are not the card's, or whose bytes are not ``sha256``."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(pattern=r"^[A-Za-z0-9._-]+\.onnx$", description="file name in the directory")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    precision: Literal["float32", "int8"]
    opset: int = Field(gt=0)
    inputs: list[str] = Field(description="uint8 (N, C, size, size) pixels, batch dynamic")
    outputs: list[str] = Field(description="float32 logits (N, classes), embedding (N, D)")
    exporter: str = Field(description="the tools that wrote it, with versions")
    created_at: str = ""
    # how it was checked or measured: max |onnx - pytorch| at export; for int8 its test top-1
    # (``test_top1``) with the float32 graph's on the same images, and how it was calibrated
    metrics: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] = Field(default_factory=dict)


class ModelCard(BaseModel):
    """card.json. Labels, input size and normalisation come from here, never from constants."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = CARD_SCHEMA_VERSION
    name: str
    version: str = "1"
    description: str = ""
    preset: str
    arch: dict[str, Any] = Field(description="the full architecture arguments (ResNetConfig)")
    labels: list[str] = Field(min_length=1)
    input: InputSpec
    embedding_dim: int = Field(gt=0)
    parameters: int = Field(ge=0, default=0)
    weights_sha256: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: str = ""
    # inference graphs by precision ("float32", "int8"), written by `imgrec export` / `quantize`
    graphs: dict[Literal["float32", "int8"], GraphSpec] = Field(default_factory=dict)
    # temperature, unknown-picture score and class maps, written by `imgrec calibrate`; a card
    # without it serves raw softmax scores and no unknown decision (app/model/calibration.py)
    calibration: CalibrationSpec | None = None

    @model_validator(mode="after")
    def _schema(self) -> ModelCard:
        if self.schema_version != CARD_SCHEMA_VERSION:
            raise ValueError(
                f"card schema_version {self.schema_version} is not supported "
                f"(this build reads version {CARD_SCHEMA_VERSION})"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.labels)
