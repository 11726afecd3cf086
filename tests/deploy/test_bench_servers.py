"""The servers the benchmarks compare against run imgrec's own code; keep them working with it.

bench/torchserve_handler.py is TorchServe's handler (imgrec's loader, image preparation and
Predictor) and bench/baseline_fastapi.py the plain FastAPI reference. Neither needs TorchServe
or a socket here: the handler is called the way TorchServe's worker calls it, the baseline app
in process (helpers.apps.running). Both must rank labels exactly as imgrec's /predict does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from helpers.apps import running
from helpers.images import png_bytes
from helpers.settings import make_settings

from app.main import create_app

ROOT = Path(__file__).resolve().parents[2]


def load_bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def same_ranking(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    return ([(g["label"], g["index"]) for g in got] == [(w["label"], w["index"]) for w in want]
            and all(abs(g["score"] - w["score"]) < 1e-4 for g, w in zip(got, want, strict=True)))


@pytest.fixture(scope="module")
def imgrec_labels(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> dict[int, list[dict[str, Any]]]:
    """imgrec's own top-5 for the test images (engine torch, as the handler's default)."""
    settings = make_settings(tiny_model_dir, tmp_path_factory.mktemp("bench"), engine="torch",
                             embed_store="memory", warmup_batches=0)

    async def labels() -> dict[int, list[dict[str, Any]]]:
        async with running(create_app(settings)) as client:
            answers = [await client.post("/predict", files={"file": ("x.png", png_bytes(seed))})
                       for seed in range(3)]
        return {seed: r.json()["results"][0]["labels"] for seed, r in enumerate(answers)}

    return asyncio.run(labels())  # a module fixture of sync tests: its own loop


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_torchserve_handler_answers_like_imgrec(
        engine: str, tiny_model_dir: Path, tmp_path: Path,
        imgrec_labels: dict[int, list[dict[str, Any]]]) -> None:
    # the directory TorchServe extracts a .mar into (bench/torchserve_compare.py's build_mar)
    for name in ("card.json", "weights.safetensors"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    (tmp_path / "imgrec_handler.json").write_text(json.dumps({
        "root": str(ROOT), "max_pixels": 10**6, "warmup_batches": 1, "max_batch_size": 4,
        "engine": engine}))
    handler = load_bench_module("torchserve_handler")
    context = SimpleNamespace(system_properties={"model_dir": str(tmp_path)})
    assert handler.handle(None, context) is None  # TorchServe's initialisation call
    answers = handler.handle([{"file": png_bytes(0)}, {"body": b"not an image"},
                              {"data": bytearray(png_bytes(2))}, {"other": b""}], context)
    assert same_ranking(answers[0]["labels"], imgrec_labels[0])
    assert "not an image" in answers[1]["error"]
    assert same_ranking(answers[2]["labels"], imgrec_labels[2])
    assert "no image" in answers[3]["error"]


async def test_plain_fastapi_baseline_answers_like_imgrec(
        tiny_model_dir: Path, imgrec_labels: dict[int, list[dict[str, Any]]]) -> None:
    baseline = load_bench_module("baseline_fastapi")
    async with running(baseline.build(str(tiny_model_dir))) as client:
        r = await client.post("/predict", files=[("file", ("a.png", png_bytes(1))),
                                                 ("file", ("b.png", png_bytes(2)))])
    assert r.status_code == 200
    got = [res["labels"] for res in r.json()["results"]]
    assert same_ranking(got[0], imgrec_labels[1]) and same_ranking(got[1], imgrec_labels[2])
