"""The inference graph in the model directory: `imgrec export`, `imgrec quantize`, the checks
that refuse a graph the card does not vouch for, and serving without PyTorch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
from conftest import make_model_dir, png_bytes
from helpers.daemons import Daemon, free_port, http_status, venv_binary, wait_until
from helpers.data import needs_data

from app.cli import main as imgrec
from app.model.card import ModelCard
from app.model.directory import CARD_FILE, GRAPH_FILES, ModelDirError, sha256_file
from app.nn.checkpoint import load_model_dir, save_model_dir
from app.nn.resnet import Bottleneck
from app.nn.tensors import normalize_batch
from app.serving.predictor import Predictor

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model directory with its graph, written by `imgrec export`."""
    d = make_model_dir(tmp_path_factory.mktemp("graph") / "m", seed=3)
    assert imgrec(["export", str(d)]) == 0
    return d


@pytest.fixture()
def copy_of(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def _edit_card(d: Path, edit: dict[str, object], graph: str = "float32") -> None:
    card = json.loads((d / CARD_FILE).read_text())
    card["graphs"][graph].update(edit)
    (d / CARD_FILE).write_text(json.dumps(card))


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


@pytest.mark.slow
def test_export_writes_the_graph_the_card_records_and_it_equals_pytorch(exported: Path) -> None:
    import onnxruntime as ort

    loaded = load_model_dir(exported)
    spec = loaded.card.graphs["float32"]
    path = exported / spec.file
    assert spec.file == GRAPH_FILES["float32"] and spec.sha256 == sha256_file(path)
    assert spec.weights_sha256 == loaded.card.weights_sha256
    assert spec.inputs == ["images"] and spec.outputs == ["logits", "embedding", "cam"]
    assert "model.onnx" in (exported / "MODEL_CARD.md").read_text()
    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    # BNs right after a conv are folded (two per bottleneck); the pre-activation ones stay
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())
    blocks = sum(isinstance(m, Bottleneck) for m in loaded.model.modules())
    assert ops["BatchNormalization"] == bns - 2 * blocks
    assert "Softmax" not in ops  # logits out
    (inp,) = proto.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8  # normalisation inside
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7):  # dynamic batch
        pixels = _pixels(n, seed=n)
        logits, embedding, cam = session.run(["logits", "embedding", "cam"], {"images": pixels})
        with torch.inference_mode():
            x = normalize_batch(torch.from_numpy(pixels), loaded.card.input)
            ref_features = loaded.model.features(x)
            ref_logits = loaded.model.head(ref_features)
        assert logits.shape == (n, 10) and embedding.shape == (n, loaded.card.embedding_dim)
        np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(embedding, ref_features.numpy(), rtol=1e-4, atol=1e-4)
        # the class maps: the logits at every cell of the last feature map, averaging to them
        assert cam.shape[:2] == (n, 10) and cam.ndim == 4
        np.testing.assert_allclose(cam.mean(axis=(2, 3)), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_graph_of_other_weights_is_refused(copy_of: Path) -> None:
    _edit_card(copy_of, {"weights_sha256": "0" * 64})
    with pytest.raises(ModelDirError, match="exported from weights 0{64}.*imgrec export"):
        Predictor(copy_of, device="cpu")


@pytest.mark.slow
def test_graph_bytes_not_the_cards_are_refused(copy_of: Path) -> None:
    with (copy_of / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelDirError, match=r"model\.onnx: sha256 mismatch"):
        Predictor(copy_of, device="cpu")
    (copy_of / "model.onnx").unlink()
    with pytest.raises(ModelDirError, match="file is missing"):
        Predictor(copy_of, device="cpu")


@pytest.mark.slow
def test_new_weights_drop_the_old_graph(copy_of: Path) -> None:
    loaded = load_model_dir(copy_of)
    with torch.no_grad():
        loaded.model.fc.bias.add_(1.0)
    card = save_model_dir(loaded.model, loaded.card, copy_of)
    assert card.graphs == {} and not (copy_of / "model.onnx").exists()


@pytest.mark.slow
def test_directory_without_graph_exports_at_start_up_and_says_so(
        tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "imgrec"):
        p = Predictor(tiny_model_dir, device="cpu", engine="onnxruntime")
    assert "no inference graph (model.onnx): exporting one at start-up" in caplog.text
    assert p.engine.name == "onnxruntime"
    assert not (tiny_model_dir / "model.onnx").exists()  # the directory is left as it was


@pytest.mark.slow
def test_predictor_serves_the_graph_without_importing_torch(exported: Path) -> None:
    """In a fresh interpreter: load and run the graph, then look at what was imported."""
    code = (
        "import sys\n"
        "from app.serving.predictor import Predictor\n"
        f"p = Predictor({str(exported)!r}, device='auto')\n"
        "out = p.forward([bytes(range(256)) * 3 + bytes(16)] * 3)\n"
        "assert len(out) == 3 and abs(float(out[0].probs.sum()) - 1) < 1e-5\n"
        "print(p.engine.name, p.device, p.dtype, sorted(m for m in sys.modules\n"
        "      if m.split('.')[0] in ('torch', 'torchvision', 'safetensors')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "onnxruntime cpu float32 []"


@pytest.mark.slow
def test_torch_engine_still_serves_the_directory(exported: Path) -> None:
    torch_p = Predictor(exported, device="cpu", engine="torch")
    ort_p = Predictor(exported, device="cpu", engine="onnxruntime")
    images = [p.tobytes() for p in _pixels(4)]
    for a, b in zip(torch_p.forward(images), ort_p.forward(images), strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-4, atol=1e-4)
    assert (torch_p.engine.name, torch_p.dtype) == ("torch", "float32")


@pytest.mark.slow
def test_int8_is_refused_without_an_int8_graph_or_its_measured_accuracy(copy_of: Path) -> None:
    with pytest.raises(ModelDirError, match="records no int8 graph.*imgrec quantize"):
        Predictor(copy_of, device="cpu", precision="int8")
    # an int8 graph the card records, but without the measured test top-1
    card = ModelCard.model_validate_json((copy_of / CARD_FILE).read_text())
    shutil.copy(copy_of / "model.onnx", copy_of / "model.int8.onnx")
    int8 = card.graphs["float32"].model_copy(update={"file": "model.int8.onnx",
                                                     "precision": "int8", "metrics": {}})
    card.graphs["int8"] = int8
    (copy_of / CARD_FILE).write_text(card.model_dump_json())
    with pytest.raises(ModelDirError, match="no measured test top-1.*refusing"):
        Predictor(copy_of, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="int8 graph with ONNX Runtime"):
        Predictor(copy_of, device="cpu", engine="torch", precision="int8")


@pytest.mark.slow
@needs_data
def test_quantize_measures_int8_and_int8_serves(copy_of: Path) -> None:
    assert imgrec(["quantize", str(copy_of), "--calibration-images", "64",
                   "--test-limit", "256", "--threads", "1"]) == 0
    card = load_model_dir(copy_of).card
    int8 = card.graphs["int8"]
    assert int8.sha256 == sha256_file(copy_of / "model.int8.onnx")
    assert int8.weights_sha256 == card.weights_sha256
    assert int8.metrics["test_images"] == 256 and 0 <= int8.metrics["test_top1"] <= 100
    assert isinstance(int8.metrics["float32_test_top1"], float)
    assert int8.calibration["images"] == 64 and int8.calibration["per_channel"] is True
    assert int8.calibration["format"] == "QDQ"
    ops = Counter(n.op_type for n in onnx.load(str(copy_of / "model.int8.onnx")).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert "int8" in (copy_of / "MODEL_CARD.md").read_text()
    p8 = Predictor(copy_of, device="cpu", precision="int8")
    p32 = Predictor(copy_of, device="cpu")
    assert (p8.engine.name, p8.dtype) == ("onnxruntime", "int8")
    images = [p.tobytes() for p in _pixels(16)]
    for a, b in zip(p8.forward(images), p32.forward(images), strict=True):
        assert abs(float(a.probs.sum()) - 1.0) < 1e-5
        cosine = float(a.embedding @ b.embedding /
                       (np.linalg.norm(a.embedding) * np.linalg.norm(b.embedding)))
        assert cosine > 0.95  # the same network, in int8


@pytest.fixture(params=["onnxruntime", "torch"])
def served(request: pytest.FixtureRequest, exported: Path, tmp_path: Path
           ) -> Iterator[tuple[str, str, int]]:
    port = free_port()
    env = {**os.environ, "IMGREC_MODEL_DIR": str(exported), "IMGREC_PORT": str(port),
           "IMGREC_EMBED_STORE": "memory", "IMGREC_LOG_LEVEL": "info",
           "IMGREC_ENGINE": request.param}
    env.pop("IMGREC_DEVICE", None)  # auto: the start-up path a CPU deployment takes
    d = Daemon("imgrec", [venv_binary("imgrec"), "serve"], tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(url + "/readyz") == 200, 120, "imgrec serve /readyz", d)
        yield request.param, url, d.pid
    finally:
        d.stop()


@pytest.mark.slow
def test_cpu_server_maps_no_pytorch(served: tuple[str, str, int]) -> None:
    """Read from the serving process itself which shared libraries it has mapped, after it
    has answered a prediction: with ONNX Runtime none of PyTorch's (the control, engine=torch,
    shows that the check sees them when they are there)."""
    engine, url, pid = served
    r = httpx.post(url + "/predict", files=[("file", ("a.png", png_bytes(5)))], timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(url + "/model").json()["engine"] == engine
    libraries = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                 if line.split()[-1].endswith(".so") or ".so." in line.split()[-1]}
    torch_libs = sorted(lib for lib in libraries
                        if "/torch/" in lib or "/torchvision" in lib or "libtorch" in lib)
    assert any("onnxruntime" in lib for lib in libraries) == (engine == "onnxruntime")
    if engine == "onnxruntime":
        assert torch_libs == []
    else:
        assert any("libtorch_cpu" in lib for lib in torch_libs)
