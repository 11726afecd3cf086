"""The model directory: ``weights.safetensors`` + ``card.json`` + ``MODEL_CARD.md``.

Loading never unpickles anything: weights are safetensors, the card is JSON validated by
pydantic, and the network is rebuilt from the card's preset and architecture arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from app.model.card import ModelCard
from app.model.directory import (
    CARD_FILE,
    GRAPH_FILES,
    README_FILE,
    WEIGHTS_FILE,
    ModelDirError,
    atomic_write_text,
    read_card,
    sha256_file,
    verify_weights,
)
from app.nn.resnet import PRESETS, PatentResNet, ResNetConfig, count_parameters

__all__ = ["CARD_FILE", "README_FILE", "WEIGHTS_FILE", "LoadedModel", "ModelDirError",
           "build_from_card", "load_model_dir", "read_card", "render_model_card",
           "save_model_dir", "sha256_file", "update_card"]


@dataclass
class LoadedModel:
    model: PatentResNet
    card: ModelCard
    path: Path


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
    sha = sha256_file(weights)
    # a graph exported from other weights no longer describes this directory: drop it
    stale = [p for p, g in card.graphs.items() if g.weights_sha256 != sha]
    for precision in stale:
        (out / GRAPH_FILES[precision]).unlink(missing_ok=True)
    card = card.model_copy(
        update={
            "graphs": {p: g for p, g in card.graphs.items() if p not in stale},
            "arch": model.config.to_dict(),
            "embedding_dim": model.embedding_dim,
            "parameters": count_parameters(model),
            "weights_sha256": sha,
            "created_at": card.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    atomic_write_text(out / CARD_FILE, card.model_dump_json(indent=2) + "\n")
    atomic_write_text(out / README_FILE, render_model_card(card, extra_markdown))
    return card


def update_card(directory: str | Path, card: ModelCard) -> None:
    """Rewrite card.json and MODEL_CARD.md of an existing directory (the weights stay as they
    are), keeping what was written below the generated part of MODEL_CARD.md (plots, lineage)."""
    root = Path(directory)
    previous = read_card(root)
    readme = root / README_FILE
    extra = ""
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        generated = render_model_card(previous)
        if text.startswith(generated):
            extra = text[len(generated):].lstrip("\n")
        elif "\n## Plots" in text:  # edited by hand above the plots: keep from the plots on
            extra = text[text.index("\n## Plots") + 1:]
    atomic_write_text(root / CARD_FILE, card.model_dump_json(indent=2) + "\n")
    atomic_write_text(readme, render_model_card(card, extra))


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
        verify_weights(root, card)
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


def _calibration_lines(card: ModelCard) -> list[str]:
    cal = card.calibration
    if cal is None:
        return []
    m, loc = cal.metrics, cal.metrics.get("localisation", {})
    lines = [
        "## Calibrated scores and unknown pictures (imgrec calibrate)", "",
        f"- temperature {cal.temperature:.4f}: test ECE {m.get('test_ece_before')} before, "
        f"{m.get('test_ece_after')} after (15 bins, {m.get('test_images')} images); top-1 "
        f"unchanged: {m.get('test_top1_unchanged')}",
        f"- unknown: {cal.ood.method} distance of the embedding to the nearest class mean "
        f"(shared covariance, fitted on {cal.ood.fit.get('images')} training images); "
        f"threshold {cal.ood.threshold:.6g} calls {cal.ood.known_fraction:.0%} of the "
        f"{m.get('val_images')} validation images known",
        f"- test images called unknown: {m.get('test_unknown_fraction')}",
    ]
    if "far_ood_unknown_fraction" in m:
        lines += [
            f"- far-OOD pictures called unknown: {m.get('far_ood_unknown_fraction')} of "
            f"{m.get('far_ood_images')} (by kind: {m.get('far_ood_by_kind')})",
            f"- class map peak in the garment's quadrant (black canvas twice the side): "
            f"{loc.get('peak_in_quadrant_top_label')} (top label), "
            f"{loc.get('peak_in_quadrant_true_label')} (true label), {loc.get('images')} "
            "images", "", "![calibration](calibration.png)"]
    for key, what in (("open_set", "open set, two classes held out"),
                      ("far_ood_scores_compared", "scores compared on far-OOD pictures")):
        if isinstance(m.get(key), dict):
            lines.append(f"- {what}: {m[key]}")
    if cal.command:
        lines.append(f"- made by `{cal.command}`")
    return [*lines, ""]


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
    if card.graphs:
        lines += ["## Inference graphs (ONNX, run by the CPU server without PyTorch)", ""]
        for precision, g in card.graphs.items():
            measured = ""
            if isinstance(g.metrics.get("test_top1"), int | float):
                measured = (f"; test top-1 {g.metrics['test_top1']:.2f}% on "
                            f"{g.metrics.get('test_images', '?')} images")
                ref = g.metrics.get("float32_test_top1")
                if isinstance(ref, int | float):
                    measured += f" (float32 graph {ref:.2f}% on the same images)"
            lines.append(f"- {precision}: `{g.file}`, sha256 `{g.sha256}`, exported from "
                         f"weights `{g.weights_sha256[:12]}`, opset {g.opset}{measured}")
        lines.append("")
    lines += _calibration_lines(card)
    if card.training.get("command"):
        lines += ["## How it was made", "", "```", str(card.training["command"]), "```", ""]
    if extra_markdown:
        lines += [extra_markdown.rstrip(), ""]
    return "\n".join(lines)
