"""The shipped model: its card's claims hold, and it serves real predictions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.apps import running
from helpers.images import encode
from helpers.settings import make_settings
from PIL import Image

from app.main import create_app
from app.nn import load_model_dir
from app.settings import DEFAULT_MODEL_DIR
from app.training.data import load_fashion_mnist

SHIPPED = DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    data = load_fashion_mnist("fashion-mnist")
    return data.test.images[:, 0].numpy(), data.test.labels.numpy()


def png(arr: np.ndarray) -> bytes:
    return encode(Image.fromarray(arr, mode="L"), "PNG")


def test_the_shipped_model_directory_is_complete() -> None:
    card = load_model_dir(SHIPPED).card  # checks the sha256 and rebuilds from the card
    for name in ("weights.safetensors", "card.json", "MODEL_CARD.md", "curves.png",
                 "confusion.png"):
        assert (SHIPPED / name).is_file(), name
    assert card.preset == "fashion" and card.metrics["test_images"] == 10_000
    assert card.metrics["test_top1"] >= 94.0
    assert card.data["source"].startswith("fashion-mnist")
    assert len(card.metrics["confusion_matrix"]) == 10


@pytest.mark.slow  # 10,000 test images through `imgrec evaluate`
def test_re_evaluation_reaches_the_top1_its_card_claims() -> None:
    out = subprocess.run([sys.executable, "-m", "app.cli", "evaluate", str(SHIPPED)],
                         capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 10_000
    assert abs(result["top1"] - load_model_dir(SHIPPED).card.metrics["test_top1"]) <= 0.05
    assert result["top1"] >= 94.0


async def test_served_predictions_are_right_and_photo_sized_uploads_agree(
        fashion_test: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images, labels = fashion_test
    settings = make_settings(SHIPPED, tmp_path, embed_store="memory")
    n = 200
    async with running(create_app(settings)) as c:
        names = (await c.get("/model")).json()["labels"]
        small, large = [], []
        for i in range(n):
            r = await c.post("/predict", params={"top_k": 1},
                             files=[("file", (f"{i}.png", png(images[i])))])
            small.append(r.json()["results"][0]["labels"][0]["index"])
            # the same garment as a 224 px RGB JPEG "photo"
            photo = Image.fromarray(images[i], mode="L").convert("RGB").resize(
                (224, 224), Image.Resampling.BICUBIC)
            r = await c.post("/predict", params={"top_k": 1},
                             files=[("file", (f"{i}.jpg", encode(photo, "JPEG", quality=92)))])
            large.append(r.json()["results"][0]["labels"][0]["index"])
        first = (await c.post("/predict", files=[("file", ("0.png", png(images[0])))])).json()
    assert first["results"][0]["labels"][0]["label"] == names[labels[0]] == "Ankle boot"
    accuracy = np.mean(np.array(small) == labels[:n])
    agreement = np.mean(np.array(small) == np.array(large))
    assert accuracy >= 0.9, accuracy
    assert agreement >= 0.95, agreement


@pytest.mark.slow  # 10,000 test images through each of the two graphs
def test_the_shipped_model_holds_its_graphs_and_the_int8_one_is_as_accurate() -> None:
    """model.onnx and model.int8.onnx are the card's (sha256, exported from these weights), and
    the int8 graph reaches the test top-1 the card records, within 0.3 points of float32."""
    import onnxruntime as ort

    from app.model.directory import graph_path, read_card

    card = read_card(SHIPPED)
    paths = {p: graph_path(SHIPPED, card, p) for p in ("float32", "int8")}
    int8 = card.graphs["int8"].metrics
    assert int8["test_images"] == 10_000
    assert abs(int8["top1_difference_points"]) <= 0.3
    assert int8["float32_test_top1"] == card.metrics["test_top1"]
    data = load_fashion_mnist("fashion-mnist")
    images, labels = data.test.images.numpy(), data.test.labels.numpy()
    for precision, path in paths.items():
        assert path is not None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        predicted = np.concatenate([
            session.run(["logits"], {"images": images[i:i + 500]})[0].argmax(1)
            for i in range(0, len(images), 500)])
        top1 = float((predicted == labels).mean() * 100)
        claimed = int8["test_top1"] if precision == "int8" else card.metrics["test_top1"]
        assert abs(top1 - claimed) <= 0.05, (precision, top1, claimed)


def test_the_shipped_model_is_calibrated_and_its_precisions_agree_on_unknown(
        fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
    from app.model.decode import load_input
    from app.serving.predictor import Predictor
    from app.training.ood_sets import far_ood

    card = load_model_dir(SHIPPED).card
    cal = card.calibration
    assert cal is not None and (SHIPPED / "calibration.png").is_file()
    m = cal.metrics
    # the goals for the shipped model, as measured by imgrec calibrate
    assert m["test_unknown_fraction"] <= 0.05 and m["test_top1_unchanged"] is True
    assert m["far_ood_unknown_fraction"] >= 0.90 and m["test_ece_after"] <= 0.03
    images, _ = fashion_test
    garments = [np.ascontiguousarray(images[i][None]).tobytes() for i in range(300)]
    pictures = [load_input(f, card.input).tobytes() for fs in far_ood().values() for f in fs]
    f32 = Predictor(SHIPPED, device="cpu", engine="onnxruntime")
    i8 = Predictor(SHIPPED, device="cpu", engine="onnxruntime", precision="int8")
    a, b = f32.forward(garments + pictures), i8.forward(garments + pictures)
    known_f32 = [p.unknown for p in a[:300]]
    assert sum(map(bool, known_f32)) <= 0.10 * 300  # the operating point keeps garments known
    assert all(p.unknown for p in a[300:]) and all(p.unknown for p in b[300:])
    same = sum(x.unknown == y.unknown for x, y in zip(a, b, strict=True))
    assert same >= 0.98 * len(a), f"float32 and int8 disagree on {len(a) - same} images"
