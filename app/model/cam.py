"""Class activation maps (Zhou et al., CVPR 2016) brought onto the model's input, numpy only.

The network's head is a global average pool then one linear layer, so the per-location logits
``W A(x, y) + b`` over the last feature map A average exactly to the logits: the graph outputs
them (``cam``, (N, classes, h, w)) and the torch engine computes the same. This module takes
one class's (h, w) map to the input's size x size pixels.

Where a cell sits on the input: every stride of this network is on a 3x3 (or the stem's k x k)
convolution padded by k // 2, so the centre of output cell j is input pixel ``stride * j``
(stride = the product of all strides, 8 for the shipped 28 px model, whose last map is 4 x 4:
its centres are pixels 0, 8, 16, 24, not the even spread 3.5, 10.5, ... a plain image resize
assumes). Pixel p reads the map at p / stride, interpolated bilinearly and clamped at the last
cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def total_stride(arch: dict[str, object]) -> int:
    strides = arch.get("strides", [])
    stem = arch.get("stem_stride", 1)
    assert isinstance(strides, Sequence) and isinstance(stem, int)
    return int(stem * math.prod(int(s) for s in strides))


def _axis(size: int, cells: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.clip(np.arange(size, dtype=np.float32) / stride, 0, cells - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, cells - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def upsample(cell_map: np.ndarray, size: int, stride: int) -> np.ndarray:
    """(h, w) -> (size, size), cell j centred on pixel stride * j; rows are y, columns x."""
    h, w = cell_map.shape
    y0, y1, fy = _axis(size, h, stride)
    x0, x1, fx = _axis(size, w, stride)
    m = cell_map.astype(np.float32)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def unit_range(values: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1] (all zeros for a flat map)."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def input_map(class_maps: np.ndarray, label: int, size: int, stride: int,
              baseline: np.ndarray | None = None) -> np.ndarray:
    """The (size, size) map in [0, 1] of class ``label`` from (classes, h, w) maps, less the
    blank picture's map of that class when ``baseline`` is given."""
    m = class_maps[label]
    if baseline is not None:
        m = m - baseline[label]
    return unit_range(upsample(m, size, stride))
