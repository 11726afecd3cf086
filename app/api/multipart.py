"""Streaming multipart parsing with limits enforced while the body arrives, not after.

python-multipart's push parser is fed chunk by chunk from the ASGI stream: the byte limit is
checked on every chunk (and up front from Content-Length), the file count on every part, so an
oversized upload is refused before it is buffered. Only parts named ``file`` are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.api.errors import ApiError

FILE_FIELD = "file"
# python-multipart logs a WARNING for every malformed body before raising: a client could fill
# the log at will. The parse error is answered as a 400 (and counted in the metrics) instead.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


@dataclass(slots=True)
class Upload:
    filename: str | None
    data: bytes


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


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body exceeds {limit} bytes")


def _parser(boundary: bytes, st: _State) -> MultipartParser:
    def on_part_begin() -> None:
        st.headers.clear()
        st.current, st.filename = None, None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        st.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        st.header_value += data[start:end]

    def on_header_end() -> None:
        st.headers[bytes(st.header_field).lower()] = bytes(st.header_value)
        st.header_field.clear()
        st.header_value.clear()

    def on_headers_finished() -> None:
        st.parts += 1
        _, params = parse_options_header(st.headers.get(b"content-disposition", b""))
        if params.get(b"name") != FILE_FIELD.encode():
            return
        if len(st.uploads) >= st.max_files:
            raise ApiError(413, "too_many_files", f"more than {st.max_files} files in one request")
        raw = params.get(b"filename")
        st.filename = raw.decode("utf-8", "replace") if raw is not None else None
        st.current = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if st.current is not None:
            st.current += data[start:end]

    def on_part_end() -> None:
        if st.current is not None:
            st.uploads.append(Upload(st.filename, bytes(st.current)))
        st.current = None

    def on_end() -> None:
        st.ended = True

    return MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_end": on_end,
    })


async def read_uploads(request: Request, max_bytes: int, max_files: int) -> list[Upload]:
    """The request's ``file`` parts, in order; 400 / 413 as JSON errors for bad bodies."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(400, "bad_request",
                       "expected a multipart/form-data body with one or more parts named 'file'")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)
    st = _State(max_files=max_files)
    parser = _parser(params[b"boundary"], st)
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
        raise ApiError(400, "bad_request", f"malformed multipart body: {e}") from None
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "client disconnected before the body ended") from None
    if not st.ended:
        raise ApiError(400, "bad_request", "malformed multipart body: it ends before its "
                       "closing boundary")
    if not st.uploads:
        raise ApiError(400, "no_file", "no part named 'file' in the upload")
    return st.uploads
