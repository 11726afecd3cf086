"""Inference engines: what runs the (BN-folded) network on a batch of uint8 images.

Every engine takes the batch as a uint8 numpy array (N, C, size, size) and normalises it as the
model card says, once per batch: inside the graph for ONNX Runtime, on the device for PyTorch
(a quarter of the bytes of float32 travel to a GPU).

* ``onnxruntime``: the model directory's inference graph (``model.onnx``, written by
  ``imgrec export`` and the trainer; ``model.int8.onnx`` with ``IMGREC_PRECISION=int8``) run by
  ONNX Runtime's CPU provider. This module and that engine import no torch: a CPU server maps
  ONNX Runtime, not the PyTorch libraries. Measured here 2-3x eager PyTorch per core with the
  HTTP side busy: ORT runs the whole graph in C++ without the GIL, so the event loop and the
  decode threads keep running while a batch computes.
* ``torch``: eager PyTorch on the model's device and dtype (bf16 on CUDA), channels_last
  (``app.serving.engine_torch``, imported only when chosen).

Both return ``Outputs``: logits, features and the class maps (logits per cell of the last
feature map, for ``?explain=true``), float32 numpy arrays. A graph exported before the class
maps existed has no ``cam`` output: its engine returns None for them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from app.model.calibration import softmax

log = logging.getLogger("imgrec.engines")


__all__ = ["Engine", "OnnxRuntimeEngine", "Outputs", "onnxruntime_available", "softmax"]


class Outputs(NamedTuple):
    logits: np.ndarray  # (N, classes)
    features: np.ndarray  # (N, D), the embedding
    cam: np.ndarray | None  # (N, classes, h, w), or None for a graph without them


class Engine(Protocol):
    name: str

    def __call__(self, images: np.ndarray) -> Outputs:
        """uint8 (N, C, size, size) -> float32 logits, features and class maps."""


class OnnxRuntimeEngine:
    """An inference graph (file or bytes) with inputs ``images`` (uint8) and outputs ``logits``,
    ``embedding`` and (graphs exported since issue 22) ``cam``, as app.nn.export writes it."""

    name = "onnxruntime"

    def __init__(self, graph: Path | bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(threads, 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph),
                                            options, providers=["CPUExecutionProvider"])
        names = [o.name for o in self.session.get_outputs()]
        if names[:2] != ["logits", "embedding"]:
            raise ValueError(f"the graph's outputs are {names}; expected logits, embedding "
                             "(export it again with imgrec export)")
        self.outputs = names[:3] if names[2:3] == ["cam"] else names[:2]
        self.has_cam = len(self.outputs) == 3

    def __call__(self, images: np.ndarray) -> Outputs:
        # one call, one release of the GIL: the whole graph, normalisation included, runs in C++
        got = self.session.run(self.outputs, {"images": images})
        return Outputs(got[0], got[1], got[2] if self.has_cam else None)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
