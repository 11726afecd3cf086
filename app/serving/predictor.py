"""The network on its device: load from a model directory, warm up, run batches.

On the CPU with ONNX Runtime nothing here imports torch: the card is read and the weights and
the inference graph are checked by ``app.model.directory``, and ONNX Runtime runs the directory's
graph. PyTorch is imported only for the torch engine (CUDA, or ``IMGREC_ENGINE=torch``) and,
as a fallback, to export a graph at start-up for a directory that has none.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.model.directory import (
    ModelDirError,
    calibration_tensors,
    graph_path,
    int8_accuracy,
    open_model_dir,
)
from app.serving.engines import Engine, OnnxRuntimeEngine, Outputs, onnxruntime_available
from app.serving.scores import Prediction, Scores
from app.serving.store_key import model_key

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("imgrec.predictor")


__all__ = ["Prediction", "Predictor"]


def _gpu_may_exist() -> bool:
    """False when this machine certainly has no usable NVIDIA GPU (no driver, or none
    visible), so that ``IMGREC_DEVICE=auto`` need not import torch to find out."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def torch_installed() -> bool:
    """Whether PyTorch can be imported here (found, not imported: that costs seconds)."""
    return importlib.util.find_spec("torch") is not None


def resolve_device(name: str) -> str:
    if name == "auto":
        if not _gpu_may_exist():
            return "cpu"
        if not torch_installed():
            log.info("an NVIDIA driver is present but PyTorch is not installed, so the model "
                     "runs on the CPU (pip install 'imgrec[gpu]' to use the GPU)")
            return "cpu"
        from app.serving.engine_torch import cuda_available

        return "cuda" if cuda_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"IMGREC_DEVICE={name!r}: use auto, cpu, cuda or cuda:N")
    return name


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return name


class Predictor:
    """Holds the model; ``forward`` is called on the batcher's single inference thread."""

    def __init__(self, model_dir: str | os.PathLike[str], device: str = "auto",
                 dtype: str = "auto", threads: int = 1, engine: str = "auto",
                 precision: str = "float32", known_fraction: float | None = None) -> None:
        started = time.perf_counter()
        root, self.card = open_model_dir(model_dir)  # refuses weights that are not the card's
        # calibrated probabilities and the unknown decision (a card without calibration: none)
        self.scores = Scores(self.card, calibration_tensors(root, self.card), known_fraction)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        cpu = self.device == "cpu"
        if engine == "auto":
            engine = ("onnxruntime" if cpu and self.dtype == "float32"
                      and onnxruntime_available() else "torch")
        if engine not in ("onnxruntime", "torch"):
            raise ValueError(f"unknown engine {engine!r} (auto, torch, onnxruntime)")
        if precision not in ("float32", "int8"):
            raise ValueError(f"unknown precision {precision!r} (float32, int8)")
        if engine == "onnxruntime" and not cpu:
            raise ValueError("IMGREC_ENGINE=onnxruntime runs on the CPU; use torch on CUDA")
        if precision == "int8":
            if engine != "onnxruntime":
                raise ValueError("IMGREC_PRECISION=int8 runs the int8 graph with ONNX Runtime on "
                                 f"the CPU, not with engine {engine} on {self.device}")
            self.dtype = "int8"
        self.engine: Engine
        if engine == "onnxruntime":
            self.engine = self._onnxruntime(root, precision, threads)
        else:
            if not torch_installed():
                raise RuntimeError(f"the torch engine (for {self.device}, {self.dtype}) needs "
                                   "PyTorch, which is not installed: pip install 'imgrec[gpu]'")
            from app.serving.engine_torch import torch_engine

            self.engine = torch_engine(str(root), self.device, self.dtype, threads)
        # the store key of the vectors this predictor computes (app/serving/store_key.py)
        self.model_key = model_key(self.card, precision)
        spec = self.card.input
        self.image_shape = (spec.channels, spec.size, spec.size)
        self.image_bytes = spec.channels * spec.size * spec.size
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        log.info("loaded %s (%s, %d parameters) on %s as %s with %s in %.2f s", self.card.name,
                 self.card.preset, self.card.parameters, self.device, self.dtype,
                 self.engine.name, time.perf_counter() - started)

    @classmethod
    def from_settings(cls, settings: Settings) -> Predictor:
        """The predictor the settings describe (the service and ``imgrec index`` alike): the
        same device, engine and precision, so the same vectors under the same model key."""
        return cls(settings.model_dir, settings.device, settings.dtype, settings.torch_threads,
                   settings.engine, settings.precision, settings.ood_known_fraction)

    def _onnxruntime(self, root: Path, precision: str, threads: int) -> OnnxRuntimeEngine:
        if precision == "int8":
            graph = graph_path(root, self.card, "int8")
            if graph is None:
                raise ModelDirError(f"{root}: IMGREC_PRECISION=int8 but the card records no "
                                    f"int8 graph; make one with imgrec quantize {root}")
            accuracy = int8_accuracy(self.card)
            if accuracy is None:
                raise ModelDirError(
                    f"{root}: IMGREC_PRECISION=int8 but the card holds no measured test top-1 "
                    f"for the int8 graph; refusing to serve an unmeasured int8 network "
                    f"(imgrec quantize {root} measures it)")
            log.info("serving the int8 graph %s (test top-1 %.2f%%, float32 %s%%)", graph.name,
                     accuracy, self.card.graphs["int8"].metrics.get("float32_test_top1", "?"))
            return OnnxRuntimeEngine(graph, threads)
        graph = graph_path(root, self.card, "float32")
        if graph is not None:
            return OnnxRuntimeEngine(graph, threads)
        if not torch_installed():
            raise ModelDirError(f"{root}: no inference graph (model.onnx), and PyTorch, which "
                                "could export one here, is not installed; export it once "
                                f"where the export extra is installed: imgrec export {root}")
        log.warning("%s has no inference graph (model.onnx): exporting one at start-up with "
                    "PyTorch, which then stays loaded in this process; run `imgrec export %s` "
                    "once to start in a fraction of the time and memory", root, root)
        from app.serving.engine_torch import export_graph_bytes

        exported = time.perf_counter()
        data = export_graph_bytes(str(root), threads)
        log.info("exported to ONNX in %.1f s", time.perf_counter() - exported)
        return OnnxRuntimeEngine(data, threads)

    def warm_up(self, batches: int, batch_size: int) -> None:
        """Check the outputs against the card once, then run ``batches`` passes per size."""
        blank = bytes(self.image_bytes)
        self.check_outputs(self.engine(np.zeros((1, *self.image_shape), np.uint8)))
        for n in {1, batch_size}:
            for _ in range(batches):
                self.forward([blank] * n)

    @property
    def explains(self) -> bool:
        """Whether its engine computes class maps (a graph exported before them does not)."""
        return bool(getattr(self.engine, "has_cam", False))

    def check_outputs(self, outputs: Outputs) -> None:
        """A network whose outputs are not the card's (another class count or embedding size)
        would answer with the wrong labels: refuse it."""
        probs, features = outputs.logits, outputs.features
        want = {"logits": (1, len(self.card.labels)),
                "embedding": (1, self.card.embedding_dim)}
        for (name, shape), got in zip(want.items(), (probs, features), strict=True):
            if tuple(got.shape) != shape:
                raise ModelDirError(f"the network's {name} have shape {tuple(got.shape)}, but "
                                    f"the card says {shape} ({len(self.card.labels)} labels, "
                                    f"embedding_dim {self.card.embedding_dim})")
            if not np.isfinite(got).all():
                raise ModelDirError(f"the network's {name} of a blank image are not finite")

    def forward(self, images: Sequence[bytes]) -> list[Prediction]:
        """Images as ``app.serving.upload_checks.prepare`` gives them (uint8 (C, size, size) bytes).

        Joining bytes and viewing them as an array hold the GIL throughout; the engine call is
        the only place the thread lets go of it, so the event loop cannot make it wait more than
        once per batch."""
        for image in images:
            if len(image) != self.image_bytes:
                raise ValueError(f"an image of {len(image)} bytes; this model takes "
                                 f"{self.image_bytes} ({self.image_shape} uint8)")
        pixels = np.frombuffer(bytearray().join(images), np.uint8)  # writable: torch wants it
        batch = pixels.reshape(len(images), *self.image_shape)
        return self.scores(self.engine(batch))
