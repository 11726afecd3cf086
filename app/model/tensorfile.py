"""The safetensors format read and written with numpy alone, for the CPU server (no torch, no
safetensors package: a plain ``pip install imgrec`` carries neither).

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length,
a JSON header naming each tensor's dtype, shape and byte range, then the raw little-endian
bytes. Nothing is executed or unpickled; ``tests/model/test_tensorfile.py`` checks that the
safetensors package reads what this writes and the other way round.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

DTYPES: dict[str, np.dtype[Any]] = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
                                    "I64": np.dtype("<i8")}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 1 << 20


class TensorFileError(ValueError):
    """Not a safetensors file this reader accepts; the message says why."""


def encode(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        dtype = array.dtype.newbyteorder("<")
        if dtype not in NAMES:
            raise TensorFileError(f"{name}: dtype {array.dtype} is not one of {list(DTYPES)}")
        data = array.astype(dtype, copy=False).tobytes()
        header[name] = {"dtype": NAMES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def decode(data: bytes) -> dict[str, np.ndarray]:
    if len(data) < 8:
        raise TensorFileError("shorter than its header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER or 8 + size > len(data):
        raise TensorFileError(f"header length {size} does not fit the file")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"header is not JSON ({e})") from None
    body = memoryview(data)[8 + size:]
    out: dict[str, np.ndarray] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(spec.get("dtype"))
        begin, end = spec.get("data_offsets", [0, -1])
        shape = tuple(int(n) for n in spec.get("shape", []))
        if dtype is None or not 0 <= begin <= end <= len(body) \
                or (end - begin) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise TensorFileError(f"{name}: bad dtype, shape or byte range {spec}")
        out[name] = np.frombuffer(body[begin:end], dtype).reshape(shape).copy()
    return out


def read(path: Path) -> dict[str, np.ndarray]:
    return decode(path.read_bytes())
