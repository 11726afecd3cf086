"""What a fuzz input must never do, for the two parsers of untrusted bytes.

``multipart(data)``: the streaming multipart parser (app/api/multipart.py) fed a request body in
chunks; ``decode(data)``: the image decode path (app/serving/upload_checks.py ``prepare``).
Each returns normally for an input the service handles as it should (parsed, or refused with a
4xx ServiceError / ImageError) and raises ``Finding`` or lets an unexpected exception out
otherwise. fuzz/run.py runs them under atheris; tests/api/test_fuzz_properties.py under
hypothesis.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from app.api.multipart import read_uploads
from app.model.card import InputSpec
from app.serving.errors import ServiceError
from app.serving.service import Upload
from app.serving.upload_checks import ImageError, prepare

T = TypeVar("T")
BOUNDARY = b"fuzzboundary"
MAX_BYTES = 1 << 20
MAX_FILES = 4
MAX_PIXELS = 4_000_000
SPECS = (InputSpec(size=28, channels=1, mean=[0.5], std=[0.25]),
         InputSpec(size=32, channels=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]))


class Finding(AssertionError):
    """An answer the service must never give."""


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never waits on anything (our receive() answers at once)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise Finding("the coroutine suspended: something awaited a real event")


def request(body: bytes, chunk: int, content_type: bytes,
            content_length: bool = True) -> Request:
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    headers = [(b"content-type", content_type)]
    if content_length:
        headers.append((b"content-length", str(len(body)).encode()))
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers,
                    "query_string": b""}, receive)


def parse(body: bytes, chunk: int = 1 << 16, content_type: bytes | None = None,
          content_length: bool = True) -> list[Upload] | ServiceError:
    """The parser's answer: the uploads, or the ServiceError it refused the body with."""
    ctype = content_type if content_type is not None else \
        b"multipart/form-data; boundary=" + BOUNDARY
    try:
        return run_sync(read_uploads(request(body, max(chunk, 1), ctype, content_length),
                                     MAX_BYTES, MAX_FILES))
    except ServiceError as e:
        return e


def multipart(body: bytes, chunk: int = 1 << 16, content_type: bytes | None = None,
              content_length: bool = True) -> None:
    outcome = parse(body, chunk, content_type, content_length)
    if isinstance(outcome, ServiceError):
        if not 400 <= outcome.status < 500 or not outcome.code or not outcome.message:
            raise Finding(f"refused with {outcome.status} {outcome.code!r}")
        return
    if not 1 <= len(outcome) <= MAX_FILES:
        raise Finding(f"{len(outcome)} uploads accepted (1..{MAX_FILES} allowed)")
    if sum(len(u.data) for u in outcome) > len(body):
        raise Finding("more upload bytes than body bytes")


def decode(data: bytes, spec: InputSpec = SPECS[1]) -> None:
    try:
        pixels = prepare(data, spec, MAX_PIXELS)
    except ImageError as e:
        if not 400 <= e.status < 500 or not e.code or not e.message:
            raise Finding(f"refused with {e.status} {e.code!r}") from e
        return
    if len(pixels) != spec.channels * spec.size * spec.size:
        raise Finding(f"{len(pixels)} bytes of pixels for a {spec.channels}x{spec.size}^2 input")
