"""The int8 graph of a model directory: a static int8 graph, calibrated on training images and
measured on the test split before the card will let anyone serve it. This module takes arrays;
``imgrec quantize`` (app/training/quantize_cli.py) loads them from the card's data set.

ONNX Runtime's own quantizer (``onnxruntime.quantization.quantize_static``) writes QDQ
(QuantizeLinear/DequantizeLinear pairs around every quantizable op, which ONNX Runtime's graph
optimiser turns into its int8 kernels), with per-channel int8 weights and uint8 activations
whose ranges come from running the float32 graph on training images. The graph keeps the
float32 graph's interface: uint8 pixels in, float32 logits and embedding out.

Weights use 7 of their 8 bits by default (``reduce_range``): on x86 CPUs without VNNI (AVX2,
AVX-512F) ONNX Runtime's u8s8 kernels multiply pairs into int16 and saturate with full-range
weights; on this machine that cost the shipped model 1.3 points of top-1, 7-bit weights none.

The int8 graph's test top-1 and the float32 graph's on the same images are written into the
card; ``IMGREC_PRECISION=int8`` serves the int8 graph only when that figure is there.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.model.card import GraphSpec, InputSpec
from app.model.decode import array_to_input
from app.model.directory import (
    GRAPH_FILES,
    ModelDirError,
    atomic_write_bytes,
    graph_path,
    open_model_dir,
    sha256_file,
)

DEFAULT_CALIBRATION_IMAGES = 1024
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]


def _session(path: Path | bytes, threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                providers=["CPUExecutionProvider"])


def top1(session: Any, images: np.ndarray, labels: np.ndarray, batch: int = 256
         ) -> tuple[float, np.ndarray]:
    """Test top-1 (percent) of a graph on uint8 images, and its predicted classes."""
    predicted = np.empty(len(images), dtype=np.int64)
    for start in range(0, len(images), batch):
        logits = session.run(["logits"], {"images": images[start:start + batch]})[0]
        predicted[start:start + batch] = logits.argmax(axis=1)
    return float((predicted == labels).mean() * 100.0), predicted


def quantize_graph(float_graph: Path, calibration: np.ndarray, out: Path,
                   reduce_range: bool = True, op_types: list[str] | None = None
                   ) -> dict[str, Any]:
    """Static QDQ int8 quantization of ``float_graph`` into ``out``; returns how it was done."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray, batch: int = 32) -> None:
            self.batches: Iterator[np.ndarray] = iter(
                [images[i:i + batch] for i in range(0, len(images), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    with tempfile.TemporaryDirectory(prefix="imgrec-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference and ONNX Runtime's graph fusions first, as ORT's docs recommend
        quant_pre_process(str(float_graph), str(prepared))
        written = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared), str(written), Reader(calibration),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=op_types or QUANTIZED_OPS)
        atomic_write_bytes(out, written.read_bytes())
    return {"format": "QDQ", "per_channel": True, "weights": "int8", "activations": "uint8",
            "method": "MinMax", "reduce_range": reduce_range, "ops": op_types or QUANTIZED_OPS}


def as_input(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (N, C, H, W) images -> the card's input size, by the colour and resize rules the
    server applies to an upload (``app.model.decode``), unless they are already at it."""
    if images.shape[1:] == (spec.channels, spec.size, spec.size):
        return np.ascontiguousarray(images)
    return np.stack([array_to_input(image, spec) for image in images])


def quantize_model_dir(directory: str | Path, calibration: np.ndarray, test_images: np.ndarray,
                       test_labels: np.ndarray, source: str, reduce_range: bool = True,
                       threads: int = 0) -> GraphSpec:
    """Write ``model.int8.onnx`` from the directory's float32 graph, measure both graphs on the
    test images, and record the int8 graph with its figures in the card."""
    from app.nn.checkpoint import update_card

    root, card = open_model_dir(directory)
    float_graph = graph_path(root, card, "float32")
    if float_graph is None:
        raise ModelDirError(f"{root}: no float32 graph to quantize; run imgrec export {root}")
    calibration = as_input(calibration, card.input)
    test_images = as_input(test_images, card.input)
    out = root / GRAPH_FILES["int8"]
    started = time.perf_counter()
    how = quantize_graph(float_graph, calibration, out, reduce_range)
    quantize_s = time.perf_counter() - started
    int8_top1, int8_pred = top1(_session(out, threads), test_images, test_labels)
    float_top1, float_pred = top1(_session(float_graph, threads), test_images, test_labels)
    float_spec = card.graphs["float32"]
    spec = GraphSpec(
        file=out.name, sha256=sha256_file(out), weights_sha256=card.weights_sha256,
        precision="int8", opset=float_spec.opset, inputs=float_spec.inputs,
        outputs=float_spec.outputs, exporter=f"{float_spec.exporter}; {_quantizer_name()}",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        metrics={"test_top1": round(int8_top1, 2), "float32_test_top1": round(float_top1, 2),
                 "top1_difference_points": round(int8_top1 - float_top1, 2),
                 "agreement_with_float32": round(float((int8_pred == float_pred).mean()), 4),
                 "test_images": len(test_images), "measured_on": cpu_int8_features()},
        calibration={**how, "images": len(calibration), "split": "train", "source": source,
                     "from_graph_sha256": float_spec.sha256, "seconds": round(quantize_s, 1)})
    graphs = dict(card.graphs)
    graphs["int8"] = spec
    update_card(root, card.model_copy(update={"graphs": graphs}))
    return spec


def cpu_int8_features() -> str:
    """The CPU's int8 instruction sets, which decide ONNX Runtime's (MLAS's) int8 kernels."""
    import platform

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    found = [f for f in wanted if f in flags]
    return f"{platform.machine()} {' '.join(found) or 'no x86 SIMD flags read'}"


def _quantizer_name() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} quantize_static"
