"""The approximate index's snapshot on disk, beside the SQLite file: one usearch file per store
key and a manifest that says what they cover.

    <store>.ann/manifest.json   {"format", "generation", "watermark", "params",
                                 "parts": {store key: {"file", "dim", "count", "crc32"}}}
    <store>.ann/<n>-<i>.usearch one graph per store key, keyed by the rows' SQLite seq

The watermark is the largest seq every row up to which the parts hold; the generation is the
store file's own random number (sqlite.py), so a snapshot is never applied to another file.
Written crash-safe: the part files under new names, fsynced, then the manifest replaced by a
rename; a crash leaves the old manifest and its files, or the new ones. Read with every check
before a byte reaches usearch (a corrupt graph must never be mapped): the manifest's format,
generation and parameters, each file's size and CRC-32, then each part's vector count.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = 1
MANIFEST = "manifest.json"


class SnapshotInvalid(Exception):
    """The snapshot cannot be used; the message says why (missing, corrupt, stale)."""


@dataclass(frozen=True, slots=True)
class Part:
    file: str
    dim: int
    count: int
    crc32: int


@dataclass(frozen=True, slots=True)
class Manifest:
    generation: int
    watermark: int
    params: dict[str, Any]
    parts: dict[str, Part]


def crc32_of(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Replace the manifest (after its part files were written and fsynced), then remove the
    files no manifest names any more."""
    body = {"format": FORMAT, "generation": manifest.generation,
            "watermark": manifest.watermark, "params": manifest.params,
            "parts": {k: {"file": p.file, "dim": p.dim, "count": p.count, "crc32": p.crc32}
                      for k, p in manifest.parts.items()}}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, sort_keys=True))
    _fsync(tmp)
    tmp.replace(folder / MANIFEST)
    _fsync(folder)
    keep = {p.file for p in manifest.parts.values()}
    for f in folder.glob("*.usearch*"):
        if f.name not in keep:
            f.unlink(missing_ok=True)


def part_file(folder: Path, watermark: int, n: int) -> Path:
    return folder / f"{watermark}-{n}.usearch"


def finish_part(path: Path, dim: int, count: int) -> Part:
    """A part file just saved: fsynced, checksummed."""
    _fsync(path)
    return Part(path.name, dim, count, crc32_of(path))


def read_manifest(folder: Path, generation: int, params: dict[str, Any]) -> Manifest:
    """The manifest, with each part file checked; SnapshotInvalid saying why not."""
    path = folder / MANIFEST
    if not path.is_file():
        raise SnapshotInvalid(f"no snapshot in {folder}")
    try:
        body = json.loads(path.read_text())
        parts = {k: Part(str(v["file"]), int(v["dim"]), int(v["count"]), int(v["crc32"]))
                 for k, v in body["parts"].items()}
        manifest = Manifest(int(body["generation"]), int(body["watermark"]),
                            dict(body["params"]), parts)
        fmt = body["format"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SnapshotInvalid(f"corrupt manifest {path}: {type(e).__name__}: {e}") from None
    if fmt != FORMAT:
        raise SnapshotInvalid(f"stale snapshot: format {fmt}, this version writes {FORMAT}")
    if manifest.generation != generation:
        raise SnapshotInvalid("stale snapshot: it was made for another store file")
    if manifest.params != params:
        raise SnapshotInvalid(f"stale snapshot: made with {manifest.params}, now {params}")
    for key, part in parts.items():
        f = folder / part.file
        if not f.is_file() or "/" in part.file:
            raise SnapshotInvalid(f"corrupt snapshot: {part.file} of {key[:20]} is missing")
        if crc32_of(f) != part.crc32:
            raise SnapshotInvalid(f"corrupt snapshot: {part.file} fails its checksum")
    return manifest
