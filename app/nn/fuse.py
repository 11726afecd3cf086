"""Inference-time folding of BNs that directly follow a convolution.

In a pre-activation bottleneck, ``conv1 -> bn2 -> relu`` and ``conv2 -> bn3 -> relu``: bn2 and
bn3 are affine maps applied straight to a conv's output, so in eval mode they fold into that
conv's weight and a bias. bn1 and the shortcut's BN follow the residual addition and stay.
The folded network computes the same function (up to float rounding) with two fewer passes
over the activations per block; the state dict of the original is untouched.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from app.nn.resnet import Bottleneck, PatentResNet


@torch.no_grad()
def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                      stride=conv.stride, padding=conv.padding, dilation=conv.dilation,  # type: ignore[arg-type]
                      groups=conv.groups, bias=True)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    assert fused.bias is not None
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fold_batchnorms(model: PatentResNet) -> PatentResNet:
    """A folded copy for inference (eval mode only: it uses the running statistics)."""
    if model.training:
        raise ValueError("fold BNs only in eval mode")
    folded = copy.deepcopy(model)
    for block in folded.modules():
        if not isinstance(block, Bottleneck):
            continue
        br = block.branch
        for conv_name, bn_name in (("conv1", "bn2"), ("conv2", "bn3")):
            conv, pre = getattr(br, conv_name), getattr(br, bn_name)
            setattr(br, conv_name, fold_into_conv(conv, pre[0]))
            pre[0] = nn.Identity()  # keep the ReLU, drop the BN
    return folded
