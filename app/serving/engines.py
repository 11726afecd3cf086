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

Both return (probs, features) as float32 numpy arrays.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger("imgrec.engines")


class Engine(Protocol):
    name: str

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, C, size, size) -> float32 (probs (N, classes), features (N, D))."""


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class OnnxRuntimeEngine:
    """An inference graph (file or bytes) with inputs ``images`` (uint8) and outputs ``logits``
    and ``embedding`` (float32), as app.nn.export writes it."""

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

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # one call, one release of the GIL: the whole graph, normalisation included, runs in C++
        logits, features = self.session.run(None, {"images": images})
        return softmax(logits), features


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
