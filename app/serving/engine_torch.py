"""The PyTorch engine (CUDA, or IMGREC_ENGINE=torch on the CPU). Imported only when chosen: the
CPU server with ONNX Runtime never loads torch."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from app.model.card import InputSpec
from app.nn.resnet import PatentResNet
from app.nn.tensors import normalize_batch
from app.serving.engines import Outputs


class _Outputs(nn.Module):
    """Normalised batch -> (logits, feature vectors, class maps), as the ONNX graph's."""

    def __init__(self, model: PatentResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fmap = self.model.feature_map(x)
        features = self.model.pool_features(fmap)
        return (self.model.head(features).float(), features.float(),
                self.model.class_maps(fmap).float())


class TorchEngine:
    name = "torch"
    has_cam = True

    def __init__(self, model: PatentResNet, spec: InputSpec, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.net = _Outputs(model.to(device, dtype).to(memory_format=torch.channels_last))
        self.spec, self.device, self.dtype = spec, device, dtype

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> Outputs:
        # uint8 travels to the device; normalisation runs there
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        x = normalize_batch(x, self.spec, self.dtype).contiguous(memory_format=torch.channels_last)
        logits, features, cam = self.net(x)
        return Outputs(logits.cpu().numpy(), features.cpu().numpy(), cam.cpu().numpy())


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
