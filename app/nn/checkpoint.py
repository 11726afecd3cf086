"""The model directory: ``weights.safetensors`` + ``card.json`` + ``MODEL_CARD.md``.

Loading never unpickles anything: weights are safetensors, the card is JSON validated by
pydantic, and the network is rebuilt from the card's preset and architecture arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from app.nn.card import ModelCard
from app.nn.resnet import PRESETS, PatentResNet, ResNetConfig, count_parameters

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
README_FILE = "MODEL_CARD.md"


class ModelDirError(ValueError):
    """A model directory that cannot be loaded; the message names the problem."""


@dataclass
class LoadedModel:
    model: PatentResNet
    card: ModelCard
    path: Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a server running as another user must read it
    os.replace(tmp, path)


def build_from_card(card: ModelCard) -> PatentResNet:
    if card.preset not in PRESETS:
        raise ModelDirError(
            f"card names unknown preset {card.preset!r}; known presets: {sorted(PRESETS)}"
        )
    try:
        config = ResNetConfig.from_dict(card.arch)
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"card has invalid architecture arguments: {e}") from None
    if config.in_channels != card.input.channels:
        raise ModelDirError(
            f"card input has {card.input.channels} channels but the network expects "
            f"{config.in_channels}"
        )
    return PatentResNet(config, card.num_classes)


def save_model_dir(model: PatentResNet, card: ModelCard, directory: str | Path,
                   extra_markdown: str = "") -> ModelCard:
    """Write weights, then the card with their sha256, then the human-readable card."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = out / WEIGHTS_FILE
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "preset": card.preset})
    os.chmod(tmp, 0o644)
    os.replace(tmp, weights)
    card = card.model_copy(
        update={
            "arch": model.config.to_dict(),
            "embedding_dim": model.embedding_dim,
            "parameters": count_parameters(model),
            "weights_sha256": sha256_file(weights),
            "created_at": card.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    _atomic_write_text(out / CARD_FILE, card.model_dump_json(indent=2) + "\n")
    _atomic_write_text(out / README_FILE, render_model_card(card, extra_markdown))
    return card


def read_card(directory: str | Path) -> ModelCard:
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise ModelDirError(f"{path}: no card.json in the model directory (refusing bare weights)")
    try:
        return ModelCard.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: card.json is not valid JSON ({e})") from None
    except ValidationError as e:
        raise ModelDirError(f"{path}: card.json is invalid: {e}") from None


def load_model_dir(directory: str | Path, verify_sha256: bool = True) -> LoadedModel:
    """Rebuild the network from the card and load its weights, refusing anything inconsistent."""
    root = Path(directory)
    if not root.is_dir():
        raise ModelDirError(f"{root}: model directory does not exist")
    card = read_card(root)
    model = build_from_card(card)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelDirError(f"{weights}: weights file is missing")
    if verify_sha256:
        actual = sha256_file(weights)
        if actual != card.weights_sha256:
            raise ModelDirError(
                f"{weights}: sha256 mismatch (card says {card.weights_sha256 or 'nothing'}, "
                f"file is {actual})"
            )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelDirError(f"{weights}: not a safetensors file ({e})") from None
    head = state.get("fc.weight")
    if head is not None and head.shape[0] != card.num_classes:
        raise ModelDirError(
            f"card lists {card.num_classes} labels but the weights' classifier head has "
            f"{head.shape[0]} outputs"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelDirError(f"{weights}: weights do not fit the card's architecture: {e}") from None
    model.eval()
    return LoadedModel(model=model, card=card, path=root)


def _fmt_metric(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def render_model_card(card: ModelCard, extra_markdown: str = "") -> str:
    """MODEL_CARD.md, generated from card.json so the two never disagree."""
    lines = [
        f"# {card.name} (version {card.version})",
        "",
        card.description or "A pre-activation bottleneck ResNet built to the patent's claims 1-5.",
        "",
        "## Network",
        f"- preset `{card.preset}`, {card.parameters:,} parameters, "
        f"{card.embedding_dim}-d embedding",
        f"- input: {card.input.channels} channel(s), {card.input.size}x{card.input.size}, "
        f"mean {card.input.mean}, std {card.input.std}",
        f"- weights sha256 `{card.weights_sha256}`",
        "",
        "## Labels",
        ", ".join(f"{i}: {name}" for i, name in enumerate(card.labels)),
        "",
    ]
    scalar = {k: v for k, v in card.metrics.items() if isinstance(v, int | float | str)}
    if scalar:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt_metric(v)} |" for k, v in scalar.items()]
        lines.append("")
    per_class = card.metrics.get("per_class_accuracy")
    if isinstance(per_class, dict):
        lines += ["## Per-class accuracy (test)", "", "| class | top-1 % |", "|---|---|"]
        lines += [f"| {k} | {_fmt_metric(v)} |" for k, v in per_class.items()]
        lines.append("")
    if card.training.get("command"):
        lines += ["## How it was made", "", "```", str(card.training["command"]), "```", ""]
    if extra_markdown:
        lines += [extra_markdown.rstrip(), ""]
    return "\n".join(lines)
