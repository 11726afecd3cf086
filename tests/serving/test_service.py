"""The Service's rules, driven directly with a fake predictor (no engine, no HTTP): every
protocol skin gets exactly these, so they are tested once, here."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import png_bytes
from helpers.apps import metric
from prometheus_client import generate_latest

from app.model.directory import open_model_dir
from app.serving.errors import (
    BadRequest,
    InferenceFailed,
    InvalidParameter,
    TooLarge,
    Unavailable,
    UnknownId,
)
from app.serving.predictor import Prediction
from app.serving.service import Lifecycle, Service, Upload, all_stored
from app.settings import Settings


class FakePredictor:
    """A stand-in for the model (named as such): the card of the tiny test model directory,
    and outputs that are a pure function of the pixels, so that equal images give equal
    vectors. ``fail`` makes the next forward pass raise; ``gate`` holds it until set."""

    def __init__(self, model_dir: Path) -> None:
        _, self.card = open_model_dir(model_dir)
        spec = self.card.input
        self.model_key = self.card.weights_sha256
        self.image_shape = (spec.channels, spec.size, spec.size)
        self.device, self.dtype, self.instance = "cpu", "float32", "test:0"
        self.batches: list[int] = []
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a forward pass begins

    def warm_up(self, batches: int, batch_size: int) -> None:
        pass

    def forward(self, images: Sequence[bytes]) -> list[Prediction]:
        self.entered.set()
        self.gate.wait(20)
        self.batches.append(len(images))
        if self.fail:
            self.fail = False
            raise RuntimeError("the engine broke")
        out = []
        for pixels in images:
            seed = int.from_bytes(hashlib.sha256(pixels).digest()[:8], "little")
            rng = np.random.default_rng(seed)
            probs = rng.random(len(self.card.labels)).astype(np.float32)
            out.append(Prediction(probs / probs.sum(),
                                  rng.standard_normal(self.card.embedding_dim).astype(np.float32)))
        return out


@pytest.fixture()
def fake(tiny_model_dir: Path) -> FakePredictor:
    return FakePredictor(tiny_model_dir)


def make_service(fake: FakePredictor, tmp_path: Path, **kw: Any) -> Service:
    settings = Settings(model_dir=fake_dir(fake), device="cpu", warmup_batches=0,
                        embed_store="memory", **kw)
    return Service(settings, predictor_loader=lambda _: fake)  # type: ignore[arg-type,return-value]


def fake_dir(fake: FakePredictor) -> Path:
    return Path(".")  # the loader ignores it: the fake carries its card


@pytest.fixture()
async def service(fake: FakePredictor, tmp_path: Path) -> AsyncIterator[Service]:
    s = make_service(fake, tmp_path, max_files=4)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def until(condition: Any, timeout_s: float = 20.0) -> None:
    """Wait for a condition another thread makes true (polled, bounded; never a fixed delay)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def rejections(service: Service, reason: str) -> float:
    text = generate_latest(service.metrics.registry).decode()
    return metric(text, f'imgrec_rejections_total{{reason="{reason}"}}')


def uploads(*seeds: int, names: Sequence[str | None] | None = None) -> list[Upload]:
    names = names or [f"{s}.png" for s in seeds]
    return [Upload(png_bytes(s), n) for s, n in zip(seeds, names, strict=True)]


# -- lifecycle -----------------------------------------------------------------------------------
async def test_lifecycle_accepts_work_from_ready_until_stopped(fake: FakePredictor,
                                                               tmp_path: Path) -> None:
    s = make_service(fake, tmp_path)
    assert s.state is Lifecycle.STARTING and not s.ready
    with pytest.raises(Unavailable) as refused:
        await s.infer(uploads(1))
    assert refused.value.code == "not_ready" and refused.value.retry_after == 1
    assert rejections(s, "not_ready") == 1  # counted once, where it was refused
    with pytest.raises(Unavailable):
        _ = s.card  # the model-loaded check
    await s.start()
    assert s.state is Lifecycle.READY and s.ready
    s.begin_drain()  # the lame duck: not ready, still serving
    assert s.state is Lifecycle.DRAINING and not s.ready
    assert len(await s.infer(uploads(1))) == 1
    await s.stop()
    assert s.state is Lifecycle.STOPPED
    with pytest.raises(Unavailable):
        s.check_accepting()
    assert rejections(s, "not_ready") == 2


# -- bounds --------------------------------------------------------------------------------------
async def test_image_count_is_bounded_for_uploads_and_pixels(service: Service) -> None:
    with pytest.raises(TooLarge) as too_many:
        await service.infer(uploads(1, 2, 3, 4, 5))
    assert too_many.value.status == 413 and too_many.value.code == "too_many_files"
    with pytest.raises(BadRequest):
        await service.infer([])
    c, h, w = service.card.input.channels, service.card.input.size, service.card.input.size
    with pytest.raises(TooLarge):
        await service.infer_pixels(np.zeros((5, c, h, w), np.uint8))
    assert len(await service.infer_pixels(np.zeros((4, c, h, w), np.uint8))) == 4


async def test_top_k_is_bounded_by_the_models_classes(service: Service) -> None:
    classes = len(service.card.labels)
    assert service.top_k(classes) == classes
    for bad in (0, classes + 1):
        with pytest.raises(InvalidParameter):
            service.top_k(bad)


async def test_results_carry_cleaned_filenames_and_the_stored_flag(service: Service) -> None:
    results = await service.infer(uploads(1, 2, names=["  a\x00b\u200b.png\n", "\x01\x02"]))
    assert [r.filename for r in results] == ["ab.png", None]
    assert all_stored(results)
    assert [i for i, _ in await service.lookup([r.id for r in results])] == \
        [r.id for r in results]


# -- store -----------------------------------------------------------------------------------------
async def test_the_same_image_twice_in_one_request_is_stored_once(service: Service) -> None:
    results = await service.infer(uploads(7, 7))
    assert results[0].id == results[1].id and all_stored(results)
    assert service.store is not None and service.store.up
    assert service.store.count() == 1
    assert len(await service.lookup([results[0].id])) == 1


async def test_lookups_name_unknown_ids_and_refuse_malformed_ones(service: Service) -> None:
    (known,) = await service.infer(uploads(3))
    unknown = "0" * 64
    with pytest.raises(UnknownId, match=unknown):
        await service.lookup([known.id, unknown])
    with pytest.raises(InvalidParameter):
        await service.lookup(["not-a-digest"])
    with pytest.raises(InvalidParameter):
        await service.lookup([known.id] * 101)
    assert (await service.lookup([known.id.upper()]))[0][0] == known.id


async def test_namespaces_keep_callers_apart(service: Service) -> None:
    (mine,) = await service.infer(uploads(4), namespace="alice")
    assert (await service.lookup([mine.id], namespace="alice"))[0][0] == mine.id
    with pytest.raises(UnknownId):
        await service.lookup([mine.id], namespace="bob")
    with pytest.raises(UnknownId):
        await service.lookup([mine.id])


async def test_search_never_returns_the_query_and_stores_it(service: Service) -> None:
    await service.infer(uploads(1, 2, 3))
    found = await service.search_uploads(uploads(4), k=10)
    (result, neighbours), = found
    assert result.stored and {n.id for n in neighbours} == \
        {hashlib.sha256(png_bytes(s)).hexdigest() for s in (1, 2, 3)}
    scores = [n.score for n in neighbours]
    assert scores == sorted(scores, reverse=True)
    image_id, filename, again = await service.search_stored(result.id, k=2)
    assert image_id == result.id and filename == "4.png" and len(again) == 2
    assert result.id not in {n.id for n in again}
    with pytest.raises(InvalidParameter):
        await service.search_stored(result.id, k=0)


# -- failures ------------------------------------------------------------------------------------
async def test_a_failing_batch_fails_its_request_and_the_service_goes_on(
        service: Service, fake: FakePredictor) -> None:
    fake.fail = True
    with pytest.raises(InferenceFailed):
        await service.infer(uploads(1))
    assert len(await service.infer(uploads(2))) == 1


async def test_a_full_queue_refuses_at_once_with_retry_after(fake: FakePredictor,
                                                             tmp_path: Path) -> None:
    s = make_service(fake, tmp_path, max_queue=2, max_files=2, max_batch_size=1)
    await s.start()
    try:
        fake.gate.clear()  # the inference thread holds the first image
        fake.entered.clear()
        first = asyncio.ensure_future(s.infer(uploads(1)))
        assert await asyncio.to_thread(fake.entered.wait, 20)
        queued = asyncio.ensure_future(s.infer(uploads(2, 3)))
        await until(lambda: s.batcher is not None and s.batcher.depth == 2)
        with pytest.raises(Unavailable) as refused:
            await s.infer(uploads(4))
        assert refused.value.code == "overloaded" and refused.value.retry_after == 1
        assert rejections(s, "queue_full") == 1
        fake.gate.set()
        assert len(await first) == 1 and len(await queued) == 2
    finally:
        fake.gate.set()
        await s.stop()
