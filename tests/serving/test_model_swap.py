"""Model updates, driven on the Service directly: which model computes, stores and names each
answer around a switch; refused directories; the directory watcher. Fake predictors stand in
for the engines (their directories are real and checked); tests/serve/test_model_update.py
does the same with a real `imgrec serve` under load."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import LABELS, make_model_dir, png_bytes
from helpers.apps import metric
from prometheus_client import generate_latest

from app.model.directory import ModelDirError, open_model_dir
from app.serving.model_swap import FAILED, IGNORED, SWITCHED, UNCHANGED, fingerprint
from app.serving.predictor import Prediction
from app.serving.service import Service, Upload
from app.settings import Settings


class FakeModel:
    """A model directory's card with outputs that are a function of (weights, pixels), so that
    the two models' vectors differ; ``gate`` holds a forward pass until set."""

    def __init__(self, model_dir: Path) -> None:
        _, self.card = open_model_dir(model_dir)  # refuses what the real Predictor refuses
        spec = self.card.input
        self.model_key = self.card.weights_sha256
        self.image_shape = (spec.channels, spec.size, spec.size)
        self.device, self.dtype, self.instance = "cpu", "float32", "test:0"
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.warmed_on: str | None = None

    def warm_up(self, batches: int, batch_size: int) -> None:
        self.warmed_on = threading.current_thread().name

    def forward(self, images: Sequence[bytes]) -> list[Prediction]:
        self.entered.set()
        assert self.gate.wait(20)
        self.batches.append(len(images))
        out = []
        for pixels in images:
            seed = int.from_bytes(hashlib.sha256(self.model_key.encode() + pixels).digest()[:8],
                                  "little")
            rng = np.random.default_rng(seed)
            probs = rng.random(len(self.card.labels)).astype(np.float32)
            out.append(Prediction(probs / probs.sum(),
                                  rng.standard_normal(self.card.embedding_dim).astype(np.float32)))
        return out


class Models:
    """The loader the Service is given: a FakeModel of the directory, as a Predictor would be
    (the settings it gets name the resolved directory, never the symlink)."""

    def __init__(self) -> None:
        self.loaded: list[Path] = []

    def __call__(self, settings: Settings) -> FakeModel:
        root = Path(settings.model_dir)
        assert not root.is_symlink(), "loaded from the resolved directory"
        self.loaded.append(root)
        return FakeModel(root)


def point(link: Path, target: Path) -> None:
    """Switch the symlink atomically, as an operator would (ln -s new tmp && mv -T tmp link)."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swap")
    a = make_model_dir(root / "a", seed=0, version="a")
    b = make_model_dir(root / "b", seed=1, version="b")
    bad = root / "bad"
    shutil.copytree(b, bad)
    with (bad / "weights.safetensors").open("r+b") as f:  # one byte changed: sha256 mismatch
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    return {"a": a, "b": b, "bad": bad}


@pytest.fixture()
def link(tmp_path: Path, dirs: dict[str, Path]) -> Path:
    current = tmp_path / "current"
    current.symlink_to(dirs["a"])
    return current


async def started(link: Path, models: Models, **kw: Any) -> Service:
    kw.setdefault("model_watch_interval_s", 0)
    settings = Settings(model_dir=link, device="cpu", warmup_batches=0, embed_store="memory",
                        **kw)
    service = Service(settings, predictor_loader=models)  # type: ignore[arg-type]
    await service.start()
    return service


@pytest.fixture()
async def swap(link: Path) -> AsyncIterator[tuple[Service, Models]]:
    models = Models()
    service = await started(link, models)
    try:
        yield service, models
    finally:
        await service.stop()


async def until(condition: Any, timeout_s: float = 20.0) -> None:
    """Poll a condition another task or thread makes true (bounded; never a fixed delay)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def reloads(service: Service, outcome: str) -> float:
    text = generate_latest(service.metrics.registry).decode()
    return metric(text, f'imgrec_model_reloads_total{{outcome="{outcome}"}}')


def upload(seed: int) -> list[Upload]:
    return [Upload(png_bytes(seed), f"{seed}.png")]


async def test_a_switch_lets_every_request_finish_on_the_model_it_started_with(
        swap: tuple[Service, Models], link: Path, dirs: dict[str, Path]) -> None:
    service, models = swap
    a = service.predictor
    assert isinstance(a, FakeModel) and a.card.version == "a"
    a.gate.clear()  # the inference thread is held inside a forward pass of model a
    running = asyncio.create_task(service.infer(upload(1)))
    await asyncio.to_thread(a.entered.wait, 20)
    queued = asyncio.create_task(service.infer(upload(2)))  # queued behind it, for model a
    await until(lambda: service.batcher is not None and service.batcher.depth == 1)

    point(link, dirs["b"])
    assert await service.reload_model("test") == SWITCHED
    b = service.predictor
    assert isinstance(b, FakeModel) and b.card.version == "b"
    assert b.warmed_on is not None and not b.warmed_on.startswith("inference"), \
        "the new model warms up off the inference thread"
    after = asyncio.create_task(service.infer(upload(3)))  # begun after the switch: model b
    await until(lambda: service.batcher is not None and service.batcher.depth == 2)
    a.gate.set()
    first, second, third = [(await t)[0] for t in (running, queued, after)]

    assert [r.card.version for r in (first, second, third)] == ["a", "a", "b"]
    assert [service.model_ref([r])["version"] for r in (first, second, third)] == ["a", "a", "b"]
    assert first.store_key == second.store_key == a.model_key
    assert third.store_key == b.model_key != a.model_key
    # the second and third images shared a batch: one forward pass per model, none mixed
    assert a.batches == [1, 1] and b.batches == [1]
    # each vector is stored under the key of the model that computed it, and read back so
    assert service.store is not None
    assert second.id in service.store.get_many(a.model_key, [second.id])
    assert third.id in service.store.get_many(b.model_key, [third.id])
    assert [i for i, _ in await service.lookup([third.id])] == [third.id]  # b is served
    with pytest.raises(Exception, match="no embedding stored"):
        await service.lookup([second.id])  # a's vector is not in b's space
    assert service.ready
    assert reloads(service, SWITCHED) == 1


async def test_a_directory_that_fails_to_load_leaves_the_old_model_serving(
        swap: tuple[Service, Models], link: Path, dirs: dict[str, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    service, _ = swap
    a = service.predictor
    point(link, dirs["bad"])
    with caplog.at_level(logging.ERROR, logger="imgrec.model"):
        assert await service.reload_model("test") == FAILED
    (line,) = [r.getMessage() for r in caplog.records if r.name == "imgrec.model"]
    assert "\n" not in line and "refused, still serving test-fashion-small a" in line
    assert "weights.safetensors: sha256 mismatch" in line
    assert service.predictor is a and service.ready
    assert (await service.infer(upload(4)))[0].card.version == "a"
    assert reloads(service, FAILED) == 1
    text = generate_latest(service.metrics.registry).decode()
    assert metric(text, f'imgrec_model_info{{name="test-fashion-small",version="a",'
                        f'weights_sha256="{a.card.weights_sha256}"}}') == 1


async def test_reloading_the_served_directory_changes_nothing(
        swap: tuple[Service, Models]) -> None:
    service, _ = swap
    a = service.predictor
    assert await service.reload_model("test") == UNCHANGED
    assert service.predictor is a and reloads(service, UNCHANGED) == 1


async def test_no_reload_before_ready_or_while_draining(link: Path, dirs: dict[str, Path]
                                                        ) -> None:
    models = Models()
    service = Service(Settings(model_dir=link, device="cpu", warmup_batches=0,
                               embed_store="memory", model_watch_interval_s=0),
                      predictor_loader=models)  # type: ignore[arg-type]
    assert await service.reload_model("test") == IGNORED  # still starting
    await service.start()
    try:
        point(link, dirs["b"])
        service.begin_drain()
        assert await service.reload_model("test") == IGNORED
        assert service.card.version == "a"
    finally:
        await service.stop()


async def test_the_watcher_switches_when_the_symlink_moves_and_skips_a_refused_directory(
        link: Path, dirs: dict[str, Path], tmp_path: Path) -> None:
    models = Models()
    service = await started(link, models, model_watch_interval_s=0.02)
    try:
        assert service.card.version == "a"
        point(link, dirs["bad"])
        await until(lambda: reloads(service, FAILED) == 1)
        assert not await service.models.check(service.reload_model), \
            "the refused directory is not tried again at every poll"
        b = shutil.copytree(dirs["b"], tmp_path / "b")
        point(link, b)
        await until(lambda: service.card.version == "b")
        assert reloads(service, SWITCHED) == 1 and reloads(service, FAILED) == 1
        assert not await service.models.check(service.reload_model)
        # a card changed in place (the same directory) is a change too
        card = b / "card.json"
        card.write_text(card.read_text().replace('"version": "b"', '"version": "b2"'))
        await until(lambda: service.card.version == "b2")
        assert reloads(service, SWITCHED) == 2
    finally:
        await service.stop()


def test_fingerprint_follows_the_symlink(link: Path, dirs: dict[str, Path]) -> None:
    f = fingerprint(link)
    assert f.directory == dirs["a"].resolve()
    assert f.card_sha256 == hashlib.sha256((dirs["a"] / "card.json").read_bytes()).hexdigest()
    assert fingerprint(link.parent / "missing").card_sha256 is None


def test_the_refusal_names_the_file(dirs: dict[str, Path]) -> None:
    with pytest.raises(ModelDirError, match="sha256 mismatch"):
        FakeModel(dirs["bad"])


async def test_the_openapi_document_follows_a_switch_to_another_class_count(
        link: Path, tmp_path: Path) -> None:
    """top_k's maximum is the served model's class count: the cached document is rebuilt when a
    model update changes it."""
    from app.main import create_app

    five = make_model_dir(tmp_path / "five", labels=LABELS[:5], version="five")
    service = await started(link, Models())
    try:
        app = create_app(service.settings)
        app.state.service = service  # the lifespan's part, with the fake engine

        def top_k_maximum() -> int:
            op = app.openapi()["paths"]["/predict"]["post"]
            (top_k,) = [p for p in op["parameters"] if p["name"] == "top_k"]
            return int(top_k["schema"]["maximum"])

        assert top_k_maximum() == 10
        point(link, five)
        assert await service.reload_model("test") == SWITCHED
        assert top_k_maximum() == 5
    finally:
        await service.stop()
