"""The PyTorch engine (CUDA, or IMGREC_ENGINE=torch on the CPU). Imported only when chosen: the
CPU server with ONNX Runtime never loads torch."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from app.model.card import InputSpec
from app.nn.resnet import PatentResNet
from app.nn.tensors import normalize_batch


class _ProbsAndFeatures(nn.Module):
    """Normalised batch -> (softmax probabilities, feature vectors), both float32."""

    def __init__(self, model: PatentResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.features(x)
        return torch.softmax(self.model.head(features).float(), dim=1), features.float()


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


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def torch_engine(model_dir: str, device: str, dtype: str, threads: int) -> TorchEngine:
    """Load the weights with PyTorch and build the engine on ``device`` in ``dtype``."""
    from app.nn.checkpoint import load_model_dir
    from app.nn.fuse import fold_batchnorms

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"IMGREC_DEVICE={device} but CUDA is not available")
    loaded = load_model_dir(model_dir)
    # BNs that directly follow a conv are folded into it: same function, fewer passes
    model = fold_batchnorms(loaded.model.eval())
    return TorchEngine(model, loaded.card.input, dev,
                       {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])


def export_graph_bytes(model_dir: str, threads: int) -> bytes:
    """The inference graph exported in memory (for a directory without model.onnx)."""
    from app.nn.checkpoint import load_model_dir
    from app.nn.export import export_onnx

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model_dir(model_dir)
    return export_onnx(loaded.model, loaded.card.input)
