"""The loss of claims 7-9: task loss + weight decay + a separate regulariser on BN parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from app.nn.resnet import bn_parameters


def decayed_weights(model: nn.Module) -> list[Tensor]:
    """Conv and linear weights: what weight decay applies to (not biases, not BN)."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def bn_regulariser(model: nn.Module) -> Tensor:
    """Claim 9: the arithmetic mean of the squares of every BN gamma and beta."""
    params = bn_parameters(model)
    if not params:
        return torch.zeros(())
    total = sum((p.pow(2).sum() for p in params), torch.zeros((), device=params[0].device))
    count = sum(p.numel() for p in params)
    return total / count


def weight_decay_term(model: nn.Module) -> Tensor:
    """0.5 * sum of squared conv/linear weights (its gradient is the classic decay w)."""
    weights = decayed_weights(model)
    return 0.5 * sum((w.pow(2).sum() for w in weights), torch.zeros((), device=weights[0].device))


@dataclass
class LossTerms:
    total: Tensor
    task: Tensor
    weight_decay: Tensor
    bn: Tensor


class PatentLoss(nn.Module):
    def __init__(self, weight_decay: float, bn_coef: float, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if bn_coef > 0 and bn_coef * 10 > weight_decay:
            raise ValueError("the BN coefficient must be at least ten times below weight decay")
        self.weight_decay = weight_decay
        self.bn_coef = bn_coef
        self.task = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, model: nn.Module, logits: Tensor, target: Tensor) -> LossTerms:
        task = self.task(logits.float(), target)
        wd = self.weight_decay * weight_decay_term(model)
        bn = self.bn_coef * bn_regulariser(model)
        return LossTerms(total=task + wd + bn, task=task, weight_decay=wd, bn=bn)
