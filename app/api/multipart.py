"""Streaming multipart parsing with limits enforced while the body arrives, not after.

python-multipart's push parser is fed chunk by chunk from the ASGI stream: the byte limit is
checked on every chunk (and up front from Content-Length), the file count on every part, so an
oversized upload is refused before it is buffered. Only parts named ``file`` are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.serving.errors import BadRequest, TooLarge
from app.serving.service import Upload

FILE_FIELD = "file"
# python-multipart logs a WARNING for every malformed body before raising: a client could fill
# the log at will. The parse error is answered as a 400 (and counted in the metrics) instead.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


@dataclass
class _State:
    max_files: int
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    current: bytearray | None = None
    filename: str | None = None
    uploads: list[Upload] = field(default_factory=list)
    parts: int = 0
    ended: bool = False


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"request body exceeds {limit} bytes", code="payload_too_large")


class _Parts(_State):
    """python-multipart's callbacks, collecting the ``file`` parts into ``uploads``."""

    def on_part_begin(self) -> None:
        self.headers.clear()
        self.current, self.filename = None, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        self.parts += 1
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        if params.get(b"name") != FILE_FIELD.encode():
            return
        if len(self.uploads) >= self.max_files:
            raise TooLarge(f"more than {self.max_files} files in one request",
                           code="too_many_files")
        raw = params.get(b"filename")
        self.filename = raw.decode("utf-8", "replace") if raw is not None else None
        self.current = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.current is not None:
            self.current += data[start:end]

    def on_part_end(self) -> None:
        if self.current is not None:
            self.uploads.append(Upload(bytes(self.current), self.filename))
        self.current = None

    def on_end(self) -> None:
        self.ended = True

    def parser(self, boundary: bytes) -> MultipartParser:
        names = ("on_part_begin", "on_header_field", "on_header_value", "on_header_end",
                 "on_headers_finished", "on_part_data", "on_part_end", "on_end")
        callbacks: Any = {name: getattr(self, name) for name in names}
        return MultipartParser(boundary, callbacks)


async def read_uploads(request: Request, max_bytes: int, max_files: int) -> list[Upload]:
    """The request's ``file`` parts, in order; 400 / 413 as JSON errors for bad bodies."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise BadRequest("expected a multipart/form-data body with one or more parts named "
                         "'file'")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)
    st = _Parts(max_files=max_files)
    parser = st.parser(params[b"boundary"])
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except MultipartParseError as e:
        raise BadRequest(f"malformed multipart body: {e}") from None
    except ClientDisconnect:
        raise BadRequest("client disconnected before the body ended") from None
    if not st.ended:
        raise BadRequest("malformed multipart body: it ends before its closing boundary")
    if not st.uploads:
        raise BadRequest("no part named 'file' in the upload", code="no_file")
    return st.uploads
