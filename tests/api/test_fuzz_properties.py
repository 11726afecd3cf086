"""Property tests (hypothesis) of the two parsers of untrusted bytes and of the HTTP app around
them: whatever a client sends, the answer is a parse or a 4xx with a JSON error, never another
exception, a 5xx, a crash or a hang. The same checks run under atheris for minutes at a time
(fuzz/run.py); its findings are the regression tests at the end.

Bounded for CI: a fixed number of examples each, derandomized (the same inputs every run), a few
seconds per test.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.apps import running
from helpers.settings import make_settings
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the fuzz/ package

import httpx

from app.main import create_app
from app.serving.errors import ServiceError
from fuzz import corpus, targets

BOUNDED = settings(max_examples=120, deadline=timedelta(seconds=5), derandomize=True,
                   database=None, suppress_health_check=[HealthCheck.too_slow])
IMAGES = corpus.images()
BODIES = corpus.bodies()
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF87a", b"GIF89a", b"BM",
         b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00", b""]


@st.composite
def mutated(draw: st.DrawFn, seeds: dict[str, bytes]) -> bytes:
    """A seed with a few random edits: truncation, byte changes, insertions, a cut-out span."""
    data = bytearray(draw(st.sampled_from(sorted(seeds.values()))))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "set", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            del data[at:]
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


# -- the multipart parser ----------------------------------------------------------------------
@BOUNDED
@given(body=st.binary(max_size=4000), chunk=st.integers(1, 64), length=st.booleans())
def test_multipart_any_bytes(body: bytes, chunk: int, length: bool) -> None:
    targets.multipart(body, chunk, content_length=length)


@BOUNDED
@given(body=mutated(BODIES), chunk=st.integers(1, 64), length=st.booleans())
def test_multipart_mutated_bodies(body: bytes, chunk: int, length: bool) -> None:
    targets.multipart(body, chunk, content_length=length)


@BOUNDED
@given(ctype=st.one_of(st.binary(max_size=80),
                       st.builds(lambda p: b"multipart/form-data; " + p, st.binary(max_size=60))),
       body=st.sampled_from(sorted(BODIES.values())))
def test_multipart_any_content_type(ctype: bytes, body: bytes) -> None:
    targets.multipart(body, 1 << 16, content_type=ctype)


NAMES = st.sampled_from(["file", "other", "files", "File", "x"])
FILENAMES = st.one_of(st.none(), st.text("abc.-_ 0123", min_size=1, max_size=12))


@BOUNDED
@given(parts=st.lists(st.tuples(NAMES, FILENAMES, st.binary(max_size=300)), max_size=7),
       chunk=st.integers(1, 97))
def test_multipart_round_trip(parts: list[tuple[str, str | None, bytes]], chunk: int) -> None:
    """A well-formed body in any chunking: exactly its `file` parts, in order, byte for byte."""
    assume(all(b"--" + targets.BOUNDARY not in data for _, _, data in parts))
    body = b"".join(corpus.part(n, d, f) for n, f, d in parts) + \
        b"--" + targets.BOUNDARY + b"--\r\n"
    files = [(f, d) for n, f, d in parts if n == "file"]
    outcome = targets.parse(body, chunk)
    if not files:
        assert isinstance(outcome, ServiceError)
        assert (outcome.status, outcome.code) == (400, "no_file")
    elif len(files) > targets.MAX_FILES:
        assert isinstance(outcome, ServiceError) and outcome.code == "too_many_files"
    else:
        assert not isinstance(outcome, ServiceError), outcome.message
        assert [(u.filename, u.data) for u in outcome] == files


# -- the decode path ---------------------------------------------------------------------------
@BOUNDED
@given(data=st.builds(bytes.__add__, st.sampled_from(MAGIC), st.binary(max_size=2000)),
       spec=st.sampled_from(targets.SPECS))
def test_decode_any_bytes(data: bytes, spec: Any) -> None:
    targets.decode(data, spec)


@BOUNDED
@given(data=mutated(IMAGES), spec=st.sampled_from(targets.SPECS))
def test_decode_mutated_images(data: bytes, spec: Any) -> None:
    targets.decode(data, spec)


def test_decode_seed_images_of_allowed_formats_are_accepted() -> None:
    from app.serving.upload_checks import ALLOWED_FORMATS, prepare

    seen = set()
    for name, data in IMAGES.items():
        fmt = name.split("-")[0].upper()
        for spec in targets.SPECS:
            if fmt in ALLOWED_FORMATS:
                assert len(prepare(data, spec, targets.MAX_PIXELS)) == \
                    spec.channels * spec.size ** 2
                seen.add(fmt)
    assert {"PNG", "JPEG", "GIF", "BMP", "WEBP"} <= seen


# -- the HTTP app, lifespan running ------------------------------------------------------------
@pytest.mark.slow
async def test_http_bad_uploads_answer_4xx_json(served_model_dir: Path, tmp_path: Path) -> None:
    app = create_app(make_settings(served_model_dir, tmp_path, max_files=4))
    ctype = "multipart/form-data; boundary=" + targets.BOUNDARY.decode()
    async with running(app) as client:
        loop = asyncio.get_running_loop()

        def send(*args: Any, **kw: Any) -> httpx.Response:  # from hypothesis's thread
            return asyncio.run_coroutine_threadsafe(client.request(*args, **kw),
                                                    loop).result(30)

        @settings(max_examples=40, deadline=timedelta(seconds=20), derandomize=True,
                  database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(path=st.sampled_from(["/predict", "/embed"]),
               body=st.one_of(mutated(BODIES), st.binary(max_size=500),
                              st.builds(lambda d: corpus.part("file", d, "f") +
                                        b"--" + targets.BOUNDARY + b"--\r\n",
                                        mutated(IMAGES))),
               query=st.sampled_from(["", "top_k=3", "embedding=true", "top_k=", "top_k=x",
                                      "normalize=1", "top_k=99"]))
        def check(path: str, body: bytes, query: str) -> None:
            r = send("POST", f"{path}?{query}", content=body,
                     headers={"content-type": ctype})
            assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code,
                                                                         r.text)
            if r.status_code != 200:
                err = r.json()["error"]
                assert set(err) == {"code", "message"} and err["code"] and err["message"]
            else:
                assert r.json()["results"]

        await asyncio.to_thread(check)
        assert (await client.get("/readyz")).status_code == 200
        ok = await client.post("/predict", files=[("file", ("a.png", IMAGES["png-L-8x8"]))])
        assert ok.status_code == 200


# -- regression tests: what atheris found ------------------------------------------------------
def test_malformed_multipart_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """atheris, multipart target: python-multipart logged a WARNING for every malformed body
    ("Expected boundary character 117, got 1 at index 5"), so any client could fill the log."""
    caplog.set_level(logging.DEBUG)
    outcome = targets.parse(b"--fuzz\x01oundary\r\n\r\n")
    assert isinstance(outcome, ServiceError) and outcome.status == 400
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# an 8x8 AVIF with one byte changed: Pillow raised RuntimeError ("Failed to decode frame 0:
# Decoding of color planes failed" on load, "Failed to decode image: Missing or empty image item"
# on open), which no except clause caught: a 500
CORRUPT_AVIF = [bytes.fromhex(
    "0000001c667479706176696600000000617669666d6966316d696166000000e96d6574610000000000000021"
    "68646c72000000000000000070696374000000aa0000000000000000000000000e7069746d00000000000100"
    "00001e696c6f6300000000440000010001000000010000010d0000004a0000002869696e6600000000000100"
    "00001a696e6665020000000001000061763031436f6c6f72000000006869707270000000496970636f000000"
    "14697370650000000000000008000000080000000e706978690000000001080000000c6176314381001c0000"
    "000013636f6c726e636c780001000d0006800000001769706d61000000000000000100010401028304000000"
    "526d64617412000a081808bf6980868350329514c6650209e50000485af7558d2ca563e8582499849e9f8d92"
    "2d01853487e35e70b4826fe4cd2133f1aeef4ca28962e2a23ad6d2fbc8079222b8fec4"
), bytes.fromhex(
    "0000001c667479706176696600000000617669666d6966316d696166000000e96d6574610000000000000021"
    "68646c72000000000000000070696374000000000000000000000000000000000e7069746d00000000000100"
    "00001e696c6f3f00000000440000010001000000010000010d0000004a0000002869696e6600000000000100"
    "00001a696e6665020000000001000061763031436f6c6f72000000006869707270000000496970636f000000"
    "14697370650000000000000008000000080000000e706978690000000001080000000c6176314381001c0000"
    "000013636f6c726e636c780001000d0006800000001769706d61000000000000000100010401028304000000"
    "526d64617412000a081808bf6980868350323c14c6650209e50000485af7558d2ca563e8582499849e9f8d92"
    "2d01853487e35e70b4826fe4cd2133f1aeef4ca28962e2a23ad6d2fbc8079222b8fec4"
)]


@pytest.mark.parametrize("data", CORRUPT_AVIF, ids=["load", "open"])
def test_corrupt_avif_is_a_415(data: bytes) -> None:
    """found by test_decode_mutated_images once AVIF joined ALLOWED_FORMATS"""
    from app.serving.upload_checks import ALLOWED_FORMATS, ImageError, prepare

    assert "AVIF" in ALLOWED_FORMATS
    for spec in targets.SPECS:
        with pytest.raises(ImageError) as e:
            prepare(data, spec, targets.MAX_PIXELS)
        assert e.value.status == 415
