"""The JSON bodies of the routes' 200 answers, as pydantic models for the OpenAPI document.

The routes still answer with ``JSONBytes`` (orjson, vectors straight from numpy): FastAPI does
not validate or re-serialise a returned Response, so these models cost nothing per request.
tests/api/test_openapi_conformance.py has schemathesis check every answer against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Sha256 = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex digest of the image's bytes")


class ModelRef(BaseModel):
    name: str
    version: str


class Label(BaseModel):
    label: str
    index: int = Field(ge=0, description="the class's position in the model's labels")
    score: float = Field(ge=0, le=1, description="the calibrated probability (softmax of the "
                         "logits over the card's temperature; the raw softmax for a card "
                         "without calibration)")


class Cam(BaseModel):
    label: str = Field(description="the top label, whose map this is")
    index: int = Field(ge=0)
    width: int = Field(gt=0, description="the model's input width")
    height: int = Field(gt=0)
    values: list[float] = Field(description="height x width values in [0, 1], row-major "
                                "(row y, then column x), over the input as the card's resize "
                                "rule makes it")


class Prediction(BaseModel):
    id: str = Sha256
    filename: str | None = Field(description="the part's filename, if it had one")
    labels: list[Label] = Field(description="top_k labels, best first")
    unknown: bool | None = Field(description="true: not like anything the model was "
                                 "trained on (ood_score above the threshold); null for a card "
                                 "without calibration")
    ood_score: float | None = Field(description="higher = less like the training data "
                                    "(Mahalanobis distance to the nearest class mean); null "
                                    "for a card without calibration")
    embedding: list[float] | None = Field(
        default=None, description="the feature vector, only with embedding=true")
    cam: Cam | None = Field(default=None, description="only with explain=true")


class PredictResponse(BaseModel):
    model: ModelRef
    results: list[Prediction] = Field(description="one per file part, in upload order")


class Embedding(BaseModel):
    id: str = Sha256
    embedding: list[float]


class EmbedResponse(BaseModel):
    model: ModelRef
    results: list[Embedding] = Field(description="one per image, in request order")


class InputInfo(BaseModel):
    """How an upload becomes the network's input (the card's input spec, as the API shows it:
    its own schema, so that a card change is an API change made on purpose)."""

    size: int = Field(gt=0, description="square input side in pixels")
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    resize: str = Field(description="stretch, or shorter-side-crop (the ImageNet rule)")
    interpolation: str


class Batching(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    request_timeout_ms: float


class Limits(BaseModel):
    max_files: int
    max_upload_bytes: int
    max_image_pixels: int


class ModelInfo(BaseModel):
    name: str
    version: str
    description: str
    preset: str
    parameters: int
    labels: list[str]
    input: InputInfo
    embedding_dim: int
    weights_sha256: str
    metrics: dict[str, Any] = Field(description="the card's evaluation metrics")
    device: str
    dtype: str
    engine: str
    instance: str = Field(description="host:pid of the serving process")
    calibration: dict[str, Any] = Field(description="calibrated: whether the card has a "
                                        "temperature and unknown threshold; threshold, "
                                        "known_fraction (the operating point) and the card's")
    batching: Batching
    limits: Limits


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]


class NeighborOut(BaseModel):
    id: str = Field(description="sha256 hex of the stored image's bytes")
    score: float = Field(ge=-1.0, le=1.0, description="cosine similarity (1.0 = same "
                         "direction)")
    filename: str | None = Field(description="the filename given when it was stored")


class SearchResult(BaseModel):
    id: str = Field(description="sha256 hex of the query image's bytes")
    filename: str | None
    neighbors: list[NeighborOut] = Field(description="best first; at most k")


class SearchResponse(BaseModel):
    model: ModelRef
    results: list[SearchResult] = Field(description="one per query image, in order")
