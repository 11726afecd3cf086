"""Where uploads are decoded: small ones on the event loop (two thread hops saved), large ones
and the rest of a many-file request on the decode threads; the same pixels and refusals."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import png_bytes
from PIL import Image
from test_service import FakePredictor, make_service, uploads

import app.serving.service as service_module
from app.serving.errors import ServiceError
from app.serving.service import INLINE_PER_REQUEST, Upload


@pytest.fixture(name="fake")
def fake_predictor(tiny_model_dir: Path) -> FakePredictor:
    return FakePredictor(tiny_model_dir)


def big_png(side: int) -> bytes:
    rng = np.random.default_rng(side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def threads_that_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread each upload's pixels were made on (a spy around the real
    decode: nothing else about it changes)."""
    seen: list[str] = []
    real = service_module.prepare

    def spy(*args: Any, **kw: Any) -> bytes:
        pixels = real(*args, **kw)
        seen.append(threading.current_thread().name)
        return pixels

    monkeypatch.setattr(service_module, "prepare", spy)
    return seen


async def infer(fake: FakePredictor, tmp_path: Path, files: list[Upload], **kw: Any) -> list[Any]:
    service = make_service(fake, tmp_path, max_files=32, **kw)
    await service.start()
    try:
        return await service.infer(files)
    finally:
        await service.stop()


async def test_small_uploads_are_decoded_on_the_loop_large_ones_on_the_pool(
        fake: FakePredictor, tmp_path: Path, threads_that_decode: list[str]) -> None:
    files = [*uploads(1, 2), Upload(big_png(256), "big.png")]
    results = await infer(fake, tmp_path, files)
    assert threads_that_decode[:2] == ["MainThread", "MainThread"]
    assert threads_that_decode[2].startswith("decode")
    assert [r.filename for r in results] == ["1.png", "2.png", "big.png"]


async def test_one_request_decodes_only_a_few_images_on_the_loop(
        fake: FakePredictor, tmp_path: Path, threads_that_decode: list[str]) -> None:
    await infer(fake, tmp_path, uploads(*range(INLINE_PER_REQUEST + 3)))
    on_loop = [t for t in threads_that_decode if t == "MainThread"]
    assert len(on_loop) == INLINE_PER_REQUEST
    assert len(threads_that_decode) == INLINE_PER_REQUEST + 3


async def test_zero_sends_every_upload_to_the_pool_with_the_same_pixels(
        fake: FakePredictor, tmp_path: Path, threads_that_decode: list[str]) -> None:
    inline = await infer(fake, tmp_path, uploads(3, 4))
    pooled = await infer(fake, tmp_path, uploads(3, 4), decode_inline_pixels=0)
    assert all(t.startswith("decode") for t in threads_that_decode[2:])
    assert [r.id for r in inline] == [r.id for r in pooled]
    for a, b in zip(inline, pooled, strict=True):
        assert np.array_equal(a.prediction.probs, b.prediction.probs)  # same pixels in


@pytest.mark.parametrize("inline_pixels", [16_384, 0])
async def test_a_bad_upload_is_refused_alike_on_the_loop_and_the_pool(
        fake: FakePredictor, tmp_path: Path, inline_pixels: int) -> None:
    files = [Upload(png_bytes(1), "ok.png"), Upload(b"not an image", "bad.png")]
    with pytest.raises(ServiceError) as refused:
        await infer(fake, tmp_path, files, decode_inline_pixels=inline_pixels)
    assert refused.value.status == 415
    assert refused.value.message.startswith("file 2 of 2: not an image")
