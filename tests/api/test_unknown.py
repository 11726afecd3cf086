"""Every answer says whether the picture is unknown, with calibrated scores, and explain=true
adds the top label's class map: /predict, /model, the setting that moves the operating point,
the Open Inference Protocol's extra outputs, both engines, and an older card or graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers.apps import running
from helpers.images import png_bytes
from helpers.settings import make_settings

from app.main import create_app
from app.model.calibration import softmax
from app.model.decode import load_input
from app.model.directory import read_card, sha256_file
from app.serving.predictor import Predictor

FILES = [png_bytes(i) for i in range(6)]


def files(blobs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def graph_outputs(model_dir: Path, blobs: list[bytes]) -> tuple[np.ndarray, ...]:
    card = read_card(model_dir)
    x = np.stack([load_input(b, card.input) for b in blobs])
    session = ort.InferenceSession(str(model_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return tuple(session.run(None, {"images": x}))


async def test_predict_answers_calibrated_scores_unknown_and_the_class_map(
        calibrated_model_dir: Path, tmp_path: Path) -> None:
    card = read_card(calibrated_model_dir)
    assert card.calibration is not None
    cal = card.calibration
    async with running(create_app(make_settings(calibrated_model_dir, tmp_path))) as c:
        r = await c.post("/predict?top_k=10&explain=true", files=files(FILES))
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        info = (await c.get("/model")).json()["calibration"]
    logits, _, cams = graph_outputs(calibrated_model_dir, FILES)
    want = softmax(logits, cal.temperature)
    for i, res in enumerate(results):
        scores = {x["index"]: x["score"] for x in res["labels"]}
        np.testing.assert_allclose([scores[k] for k in range(10)], want[i], rtol=1e-4, atol=1e-6)
        assert isinstance(res["ood_score"], float)
        assert res["unknown"] is (res["ood_score"] > cal.ood.threshold)
        cam = res["cam"]
        top = int(np.argmax(logits[i]))
        assert (cam["label"], cam["index"]) == (card.labels[top], top)
        assert (cam["width"], cam["height"]) == (card.input.size, card.input.size)
        values = np.array(cam["values"]).reshape(cam["height"], cam["width"])
        assert values.min() == 0.0 and values.max() == 1.0
    assert info["calibrated"] is True and info["threshold"] == pytest.approx(cal.ood.threshold)
    assert info["known_fraction"] == 0.95 and info["temperature"] == cal.temperature
    # the map is computed for the answer only when asked
    async with running(create_app(make_settings(calibrated_model_dir, tmp_path))) as c:
        plain = (await c.post("/predict", files=files(FILES[:1]))).json()["results"][0]
    assert "cam" not in plain and plain["ood_score"] == pytest.approx(results[0]["ood_score"],
                                                                      rel=1e-5)


async def test_the_setting_moves_the_operating_point(calibrated_model_dir: Path,
                                                     tmp_path: Path) -> None:
    cal = read_card(calibrated_model_dir).calibration
    assert cal is not None
    blobs = [png_bytes(i) for i in range(12)]
    answers = {}
    for fraction in (0.5, 1.0):
        settings = make_settings(calibrated_model_dir, tmp_path, ood_known_fraction=fraction)
        async with running(create_app(settings)) as c:
            info = (await c.get("/model")).json()["calibration"]
            r = await c.post("/predict", files=files(blobs))
        assert info["known_fraction"] == fraction
        assert info["threshold"] == pytest.approx(cal.ood.threshold_at(fraction))
        assert info["card_known_fraction"] == 0.95
        answers[fraction] = [x["unknown"] for x in r.json()["results"]]
        assert all(x["unknown"] is (x["ood_score"] > info["threshold"])
                   for x in r.json()["results"])
    assert sum(answers[0.5]) >= sum(answers[1.0])
    with pytest.raises(ValueError, match="outside"):
        Predictor(calibrated_model_dir, device="cpu", known_fraction=0.1)


async def test_an_old_card_serves_as_today_and_says_so(served_model_dir: Path,
                                                       tmp_path: Path) -> None:
    assert read_card(served_model_dir).calibration is None
    async with running(create_app(make_settings(served_model_dir, tmp_path))) as c:
        info = (await c.get("/model")).json()["calibration"]
        r = await c.post("/predict?top_k=10", files=files(FILES[:2]))
        meta = (await c.get("/v2/models/test-fashion-small")).json()
    assert info == {"calibrated": False, "message": info["message"]}
    assert "no calibration" in info["message"]
    logits = graph_outputs(served_model_dir, FILES[:2])[0]
    for res, want in zip(r.json()["results"], softmax(logits), strict=True):
        assert res["unknown"] is None and res["ood_score"] is None
        got = sorted(res["labels"], key=lambda x: x["index"])
        np.testing.assert_allclose([x["score"] for x in got], want, rtol=1e-4, atol=1e-6)
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "embedding"]
    with pytest.raises(ValueError, match="no calibration"):
        Predictor(served_model_dir, device="cpu", known_fraction=0.9)


async def test_a_graph_without_class_maps_refuses_explain_only(served_model_dir: Path,
                                                               tmp_path: Path) -> None:
    import onnx

    old = Path(shutil.copytree(served_model_dir, tmp_path / "old"))
    proto = onnx.load(str(old / "model.onnx"))
    assert [o.name for o in proto.graph.output] == ["logits", "embedding", "cam"]
    del proto.graph.output[2]  # as exported before the class maps existed
    onnx.save(proto, str(old / "model.onnx"))
    card = read_card(old)
    graph = card.graphs["float32"].model_copy(update={"sha256": sha256_file(old / "model.onnx")})
    (old / "card.json").write_text(card.model_copy(
        update={"graphs": {"float32": graph}}).model_dump_json())
    async with running(create_app(make_settings(old, tmp_path))) as c:
        ok = await c.post("/predict", files=files(FILES[:1]))
        refused = await c.post("/predict?explain=true", files=files(FILES[:1]))
    assert ok.status_code == 200 and "cam" not in ok.json()["results"][0]
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "explain_unavailable"


async def test_oip_returns_ood_score_and_unknown(calibrated_model_dir: Path,
                                                 tmp_path: Path) -> None:
    name = read_card(calibrated_model_dir).name
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [3, 1, 28, 28],
                        "data": np.stack([load_input(b, read_card(calibrated_model_dir).input)
                                          for b in FILES[:3]]).ravel().tolist()}]}
    async with running(create_app(make_settings(calibrated_model_dir, tmp_path))) as c:
        meta = (await c.get(f"/v2/models/{name}")).json()
        r = await c.post(f"/v2/models/{name}/infer", json=body)
        binary = await c.post(f"/v2/models/{name}/infer", json={**body, "outputs": [
            {"name": "unknown", "parameters": {"binary_data": True}}]})
        predict = (await c.post("/predict", files=files(FILES[:3]))).json()["results"]
    assert {"name": "unknown", "datatype": "BOOL", "shape": [-1]} in meta["outputs"]
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert set(out) == {"probabilities", "embedding", "ood_score", "unknown"}
    assert out["unknown"]["datatype"] == "BOOL" and out["unknown"]["shape"] == [3]
    np.testing.assert_allclose(out["ood_score"]["data"], [p["ood_score"] for p in predict],
                               rtol=1e-5)
    assert out["unknown"]["data"] == [p["unknown"] for p in predict]
    size = int(binary.headers["inference-header-content-length"])
    assert np.frombuffer(binary.content[size:], np.bool_).tolist() == out["unknown"]["data"]


def test_both_engines_agree_on_unknown_scores_and_maps(calibrated_model_dir: Path) -> None:
    card = read_card(calibrated_model_dir)
    x = [load_input(b, card.input).tobytes() for b in FILES]
    onnx_p = Predictor(calibrated_model_dir, device="cpu", engine="onnxruntime")
    torch_p = Predictor(calibrated_model_dir, device="cpu", engine="torch")
    assert (onnx_p.engine.name, torch_p.engine.name) == ("onnxruntime", "torch")
    for a, b in zip(onnx_p.forward(x), torch_p.forward(x), strict=True):
        assert a.unknown == b.unknown
        assert a.ood_score == pytest.approx(b.ood_score, rel=1e-3)
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        assert a.cam is not None and b.cam is not None
        np.testing.assert_allclose(a.cam, b.cam, atol=1e-3 * float(np.abs(b.cam).max()))
