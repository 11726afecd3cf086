"""Inference engines: what runs the (BN-folded) network on a batch of uint8 images.

Every engine takes the batch as a uint8 numpy array (N, C, size, size) and normalises it as the
model card says, once per batch: inside the exported graph for ONNX Runtime, on the device for
PyTorch (a quarter of the bytes of float32 travel to a GPU).

* ``torch``: eager PyTorch on the model's device and dtype (bf16 on CUDA), channels_last.
* ``onnxruntime``: the same network exported with ``torch.onnx.export(dynamo=True)`` at start-up
  and run by ONNX Runtime's CPU provider. Measured here 2-3x eager PyTorch per core with the
  HTTP side busy: ORT runs the whole graph in C++ without the GIL, so the event loop and the
  decode threads keep running while a batch computes.

``auto`` picks ONNX Runtime on the CPU and PyTorch on CUDA. Both return (probs, features) as
float32 numpy arrays.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from app.nn.card import InputSpec
from app.nn.preprocess import normalize_batch
from app.nn.resnet import PatentResNet

log = logging.getLogger("imgrec.engines")


class Engine(Protocol):
    name: str

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, C, size, size) -> float32 (probs (N, classes), features (N, D))."""


class _ProbsAndFeatures(nn.Module):
    """Normalised batch -> (softmax probabilities, feature vectors), both float32."""

    def __init__(self, model: PatentResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.features(x)
        return torch.softmax(self.model.head(features).float(), dim=1), features.float()


class _FromPixels(nn.Module):
    """uint8 batch -> the card's normalisation -> _ProbsAndFeatures; what ONNX Runtime runs."""

    def __init__(self, model: PatentResNet, spec: InputSpec) -> None:
        super().__init__()
        self.spec = spec
        self.net = _ProbsAndFeatures(model)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(normalize_batch(images, self.spec))


class TorchEngine:
    name = "torch"

    def __init__(self, model: PatentResNet, spec: InputSpec, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.net = _ProbsAndFeatures(model.to(device, dtype).to(memory_format=torch.channels_last))
        self.spec, self.device, self.dtype = spec, device, dtype

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # uint8 travels to the device; normalisation runs there
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        x = normalize_batch(x, self.spec, self.dtype).contiguous(memory_format=torch.channels_last)
        probs, features = self.net(x)
        return probs.cpu().numpy(), features.cpu().numpy()


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, model: PatentResNet, spec: InputSpec, threads: int) -> None:
        import onnxruntime as ort

        example = torch.zeros(2, spec.channels, spec.size, spec.size, dtype=torch.uint8)
        started = time.perf_counter()
        batch = torch.export.Dim("batch", min=1, max=4096)
        # the exporter reports its progress on stdout; keep the service's output clean
        with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False):
            program = torch.onnx.export(
                _FromPixels(model.float().cpu(), spec).eval(), (example,), dynamo=True,
                input_names=["images"], output_names=["probs", "features"],
                dynamic_shapes={"images": {0: batch}}, verbose=False)
        assert program is not None
        onnx_bytes = program.model_proto.SerializeToString()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(threads, 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes, options,
                                            providers=["CPUExecutionProvider"])
        log.info("exported to ONNX and built an ONNX Runtime session in %.1f s",
                 time.perf_counter() - started)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # one call, one release of the GIL: the whole graph, normalisation included, runs in C++
        probs, features = self.session.run(None, {"images": images})
        return probs, features


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def build_engine(name: str, model: PatentResNet, spec: InputSpec, device: torch.device,
                 dtype: torch.dtype, threads: int) -> Engine:
    if name == "auto":
        name = ("onnxruntime" if device.type == "cpu" and dtype == torch.float32
                and onnxruntime_available() else "torch")
    if name == "onnxruntime":
        if device.type != "cpu":
            raise ValueError("IMGREC_ENGINE=onnxruntime runs on the CPU; use torch on CUDA")
        return OnnxRuntimeEngine(model, spec, threads)
    if name == "torch":
        return TorchEngine(model, spec, device, dtype)
    raise ValueError(f"unknown engine {name!r} (auto, torch, onnxruntime)")
