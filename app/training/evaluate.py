"""Evaluate a network on a split: loss, top-1, per-class accuracy, confusion matrix."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from app.model.card import InputSpec
from app.nn.tensors import normalize_batch
from app.training.data import ImageDataset, Split


@dataclass
class EvalResult:
    n: int
    loss: float
    top1: float  # percent
    confusion: Tensor  # (classes, classes): rows true, columns predicted

    def per_class(self, labels: list[str]) -> dict[str, float]:
        totals = self.confusion.sum(1).clamp(min=1)
        acc = self.confusion.diag().double() / totals * 100
        return {name: round(float(a), 2) for name, a in zip(labels, acc, strict=True)}


def _batches(split: Split, spec: InputSpec, batch_size: int,
             workers: int) -> DataLoader[tuple[Tensor, int]] | list[tuple[Tensor, Tensor]]:
    if split.images is not None and tuple(split.images.shape[-2:]) == (spec.size, spec.size):
        return [(split.images[i : i + batch_size], split.labels[i : i + batch_size])
                for i in range(0, len(split), batch_size)]
    ds = ImageDataset(split, spec)  # already at the input size, by the card's resize rule
    return DataLoader(ds, batch_size=batch_size, num_workers=workers)


def autocast_for(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[None]:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, spec: InputSpec, num_classes: int,
             device: torch.device, batch_size: int = 256, amp: bool = False,
             workers: int = 0) -> EvalResult:
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n = 0.0, 0
    for images, labels in _batches(split, spec, batch_size, workers):
        x = normalize_batch(images, spec).to(device, memory_format=torch.channels_last)
        y = labels.to(device)
        with autocast_for(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        pred = logits.argmax(1).cpu()
        confusion += torch.bincount(labels * num_classes + pred,
                                    minlength=num_classes**2).view(num_classes, num_classes)
        n += len(labels)
    model.train(was_training)
    correct = int(confusion.diag().sum())
    return EvalResult(n=n, loss=loss_sum / max(n, 1), top1=100.0 * correct / max(n, 1),
                      confusion=confusion)
