"""Reading a model directory without PyTorch: the card, and the files it vouches for.

The CPU serving process reads its model through this module only. It never imports torch,
safetensors or the network: it checks that the weights are the card's (sha256), and that an
inference graph was exported from exactly those weights and is byte for byte the graph the card
recorded. A directory that fails any check is refused with a message that names the file and
what to do; nothing here unpickles anything (the card is JSON validated by pydantic).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ValidationError

from app.model import tensorfile
from app.model.card import GraphSpec, ModelCard

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
README_FILE = "MODEL_CARD.md"
Precision = Literal["float32", "int8"]
GRAPH_FILES: dict[Precision, str] = {"float32": "model.onnx", "int8": "model.int8.onnx"}


class ModelDirError(ValueError):
    """A model directory that cannot be loaded; the message names the problem."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write beside the target, then rename: a reader sees the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a server running as another user must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_card(directory: str | os.PathLike[str]) -> ModelCard:
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise ModelDirError(f"{path}: no card.json in the model directory (refusing bare weights)")
    try:
        return ModelCard.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: card.json is not valid JSON ({e})") from None
    except ValidationError as e:
        raise ModelDirError(f"{path}: card.json is invalid: {e}") from None


def open_model_dir(directory: str | os.PathLike[str]) -> tuple[Path, ModelCard]:
    """The directory and its card, with the weights checked against the card's sha256."""
    root = Path(directory)
    if not root.is_dir():
        raise ModelDirError(f"{root}: model directory does not exist")
    card = read_card(root)
    verify_weights(root, card)
    return root, card


def verify_weights(root: Path, card: ModelCard) -> Path:
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelDirError(f"{weights}: weights file is missing")
    actual = sha256_file(weights)
    if actual != card.weights_sha256:
        raise ModelDirError(
            f"{weights}: sha256 mismatch (card says {card.weights_sha256 or 'nothing'}, "
            f"file is {actual})"
        )
    return weights


def graph_path(root: Path, card: ModelCard, precision: Precision) -> Path | None:
    """The verified graph file of that precision, or None when the card records none.

    A recorded graph that was exported from other weights, is missing, or whose bytes are not
    the recorded ones is an error, never a silent fallback: serving it would answer with a
    network the card does not describe."""
    spec: GraphSpec | None = card.graphs.get(precision)
    if spec is None:
        return None
    path = root / spec.file
    redo = f"imgrec export {root}" + (f", then imgrec quantize {root}"
                                      if precision == "int8" else "")
    if spec.weights_sha256 != card.weights_sha256:
        raise ModelDirError(
            f"{path}: the {precision} graph was exported from weights {spec.weights_sha256}, "
            f"but the card's weights are {card.weights_sha256}; export it again ({redo})")
    if not path.is_file():
        raise ModelDirError(f"{path}: the card records a {precision} graph but the file is "
                            f"missing; export it again ({redo})")
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise ModelDirError(f"{path}: sha256 mismatch (card says {spec.sha256}, file is "
                            f"{actual}); export it again ({redo})")
    return path


def int8_accuracy(card: ModelCard) -> float | None:
    """The int8 graph's measured test top-1 (percent), or None when the card holds none."""
    spec = card.graphs.get("int8")
    value = spec.metrics.get("test_top1") if spec is not None else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def calibration_tensors(root: Path, card: ModelCard) -> dict[str, np.ndarray] | None:
    """The verified calibration statistics (class means, precision), or None when the card
    has no calibration. Fitted for other weights, missing, or not the recorded bytes: refused,
    as a graph is (calibrate again)."""
    spec = card.calibration
    if spec is None:
        return None
    path = root / spec.ood.file
    redo = f"calibrate it again (imgrec calibrate {root})"
    if spec.weights_sha256 != card.weights_sha256:
        raise ModelDirError(f"{path}: the calibration was fitted for weights "
                            f"{spec.weights_sha256}, but the card's weights are "
                            f"{card.weights_sha256}; {redo}")
    if not path.is_file():
        raise ModelDirError(f"{path}: the card records a calibration but the file is missing; "
                            f"{redo}")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.ood.sha256:
        raise ModelDirError(f"{path}: sha256 mismatch (card says {spec.ood.sha256}, file is "
                            f"{actual}); {redo}")
    try:
        tensors = tensorfile.decode(data)
    except tensorfile.TensorFileError as e:
        raise ModelDirError(f"{path}: {e}") from None
    want = {"class_means": (card.num_classes, card.embedding_dim),
            "precision": (card.embedding_dim, card.embedding_dim)}
    for name, shape in want.items():
        if name not in tensors or tensors[name].shape != shape:
            got = tensors[name].shape if name in tensors else "missing"
            raise ModelDirError(f"{path}: {name} should be {shape}, is {got}; {redo}")
    return tensors
