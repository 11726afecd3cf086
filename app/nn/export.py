"""The inference graph: a model directory's network as ONNX, for serving without PyTorch.

``imgrec export MODEL_DIR`` (and the trainer, after it writes the weights) folds the BNs that
follow a convolution, puts the card's normalisation inside the graph and exports with
``torch.onnx.export(dynamo=True)``: uint8 pixels (N, C, size, size) in, with N dynamic;
float32 ``logits`` (N, classes), ``embedding`` (N, D) and ``cam`` (N, classes, h, w), the
logits at each cell of the last feature map (the class activation maps), out. Before the
graph is written, ONNX Runtime runs it on random pixels and its outputs are compared with the
PyTorch network's; the card then records the graph's sha256 and the weights' sha256 it came from.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from app.model.card import GraphSpec, InputSpec
from app.model.directory import GRAPH_FILES, atomic_write_bytes, sha256_file
from app.nn.checkpoint import load_model_dir, update_card
from app.nn.fuse import fold_batchnorms
from app.nn.resnet import PatentResNet

INPUTS = ["images"]
OUTPUTS = ["logits", "embedding", "cam"]
MAX_BATCH = 4096
# |onnx - pytorch| allowed at export, relative to the largest output magnitude
TOLERANCE = 1e-4


class InferenceGraph(nn.Module):
    """uint8 pixels -> the card's normalisation -> (logits, embedding, cam), float32."""

    def __init__(self, model: PatentResNet, spec: InputSpec) -> None:
        super().__init__()
        self.model = model
        # the trainer's normalisation, (x / 255 - mean) / std, as one multiply and one subtract
        self.scale: Tensor
        self.shift: Tensor
        self.register_buffer("scale", torch.tensor(
            [1.0 / (255.0 * s) for s in spec.std], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(
            [m / s for m, s in zip(spec.mean, spec.std, strict=True)],
            dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = images.to(torch.float32) * self.scale - self.shift
        fmap = self.model.feature_map(x)
        features = self.model.pool_features(fmap)
        return (self.model.head(features).float(), features.float(),
                self.model.class_maps(fmap).float())


def export_onnx(model: PatentResNet, spec: InputSpec) -> bytes:
    """The eval-mode network as ONNX bytes (BNs folded, normalisation inside, dynamic batch)."""
    graph = InferenceGraph(fold_batchnorms(model.float().cpu().eval()), spec).eval()
    example = torch.zeros(2, spec.channels, spec.size, spec.size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # the exporter reports its progress on stdout; keep the caller's output clean
    with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False):
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=INPUTS,
                                    output_names=OUTPUTS, dynamic_shapes={"images": {0: batch}},
                                    verbose=False)
    assert program is not None
    return bytes(program.model_proto.SerializeToString())


def onnx_opset(data: bytes) -> int:
    import onnx

    proto = onnx.load_from_string(data)
    return max(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def compare_with_torch(data: bytes, model: PatentResNet, spec: InputSpec,
                       batch: int = 5, seed: int = 0) -> float:
    """Largest |ONNX Runtime - PyTorch| over logits and embedding of random pixels, relative to
    the largest output magnitude; the reference is the unfolded network."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (batch, spec.channels, spec.size, spec.size), dtype=np.uint8)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = session.run(OUTPUTS, {"images": pixels})
    reference = InferenceGraph(model.float().cpu().eval(), spec).eval()
    with torch.inference_mode():
        wanted = reference(torch.from_numpy(pixels))
    worst = 0.0
    for got, want_t in zip(outputs, wanted, strict=True):
        want = want_t.numpy()
        scale = max(float(np.abs(want).max()), 1e-6)
        worst = max(worst, float(np.abs(got - want).max()) / scale)
    return worst


def exporter_name() -> str:
    import onnx
    import onnxscript

    return (f"torch {torch.__version__} (torch.onnx.export dynamo=True), onnxscript "
            f"{onnxscript.__version__}, onnx {onnx.__version__}")


def export_model_dir(directory: str | Path) -> GraphSpec:
    """Write ``model.onnx`` into a model directory and record it in the card."""
    loaded = load_model_dir(directory)
    root, card = Path(directory), loaded.card
    data = export_onnx(loaded.model, card.input)
    error = compare_with_torch(data, loaded.model, card.input)
    if error > TOLERANCE:
        raise RuntimeError(f"the exported graph differs from the PyTorch network by {error:.2e} "
                           f"(relative; allowed {TOLERANCE:.0e}); not writing it")
    path = root / GRAPH_FILES["float32"]
    atomic_write_bytes(path, data)
    spec = GraphSpec(
        file=path.name, sha256=sha256_file(path), weights_sha256=card.weights_sha256,
        precision="float32", opset=onnx_opset(data), inputs=INPUTS, outputs=OUTPUTS,
        exporter=exporter_name(), created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        metrics={"max_rel_diff_vs_pytorch": float(f"{error:.3g}")})
    graphs = dict(card.graphs)
    graphs["float32"] = spec
    # an int8 graph quantized from another float32 graph of the same weights stays valid
    update_card(root, card.model_copy(update={"graphs": graphs}))
    return spec


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="imgrec export",
        description="Write the inference graph (model.onnx: BNs folded, normalisation inside, "
                    "dynamic batch; outputs logits, embedding and the class maps) into a "
                    "model directory and record its sha256 in the card. The CPU server then "
                    "starts without PyTorch.")
    p.add_argument("model_dir")
    args = p.parse_args(argv)
    spec = export_model_dir(args.model_dir)
    print(f"wrote {Path(args.model_dir) / spec.file} (sha256 {spec.sha256}, opset {spec.opset}, "
          f"max relative difference from PyTorch {spec.metrics['max_rel_diff_vs_pytorch']:.1e})",
          file=sys.stderr)
    return 0
