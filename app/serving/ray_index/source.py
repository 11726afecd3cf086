"""What a catalogue is: the files a SOURCE names, each with the filename it is stored under.

SOURCE is one of

- a folder (or an ImageFolder tree: one folder per class), local or a URI: every image file
  under it at any depth, by the single-machine indexer's extensions (bulk_index.EXTENSIONS),
  sorted by path, each stored under its path relative to the folder (``coat/0042.png``);
- a file listing paths, one a line (blank lines and lines starting with ``#`` are ignored):
  each listed file whatever its name, stored under the line as written; relative lines are
  relative to the listing's folder, and a listing's entries are on one filesystem (its own, or
  the one the first URI names);
- any URI that pyarrow's filesystems open (``s3://bucket/prefix``, ``gs://...``, ``hdfs://``,
  ``file:///...``), for either of the two.

Listing runs on the driver and reads no file; the files are read by the pipeline's tasks,
through the same pyarrow filesystem (which pickles, so it travels to the cluster's workers).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.serving.bulk_index import EXTENSIONS
from app.serving.request_rules import clean_filename

if TYPE_CHECKING:
    import pyarrow.fs as pafs


class SourceError(ValueError):
    """A SOURCE that names nothing to index (missing, unreadable, a listing of another
    filesystem's files)."""


@dataclass
class Listing:
    """The catalogue's files: path on ``fs``, stored filename, size in bytes (-1 unknown)."""

    fs: pafs.FileSystem
    paths: list[str]
    filenames: list[str | None]
    sizes: list[int]
    what: str  # "folder" or "listing", for the summary

    def __len__(self) -> int:
        return len(self.paths)


def is_uri(source: str) -> bool:
    return "://" in source


def _filesystem(source: str) -> tuple[pafs.FileSystem, str]:
    import pyarrow.fs as pafs

    if is_uri(source):
        try:
            return pafs.FileSystem.from_uri(source)
        except (ValueError, OSError) as e:  # unknown scheme, no credentials, no such bucket
            raise SourceError(f"{source}: {e}") from None
    return pafs.LocalFileSystem(), str(Path(source).resolve())


def list_source(source: str) -> Listing:
    """The files SOURCE names (see the module's docstring); raises SourceError."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(source)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise SourceError(f"{source}: {e}") from None
    if info.type == pafs.FileType.Directory:
        return _folder(fs, path)
    if info.type == pafs.FileType.File:
        return _listing(fs, path, source)
    raise SourceError(f"{source}: no such folder or file")


def _folder(fs: pafs.FileSystem, root: str) -> Listing:
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise SourceError(f"{root}: {e}") from None
    files = sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File
                   and posixpath.splitext(i.base_name)[1].lower() in EXTENSIONS)
    base = root.rstrip("/") + "/"
    return Listing(fs, [p for p, _ in files],
                   [clean_filename(p.removeprefix(base)) for p, _ in files],
                   [-1 if s is None else int(s) for _, s in files], "folder")


def _listing(fs: pafs.FileSystem, path: str, source: str) -> Listing:
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{source}: not a readable listing of paths: {e}") from None
    lines = [s for s in (line.strip() for line in text.splitlines())
             if s and not s.startswith("#")]
    if lines and is_uri(lines[0]):
        fs, _ = _filesystem(lines[0])
    here = posixpath.dirname(path)
    paths = [_entry(fs, line, here, source) for line in lines]
    return Listing(fs, paths, [clean_filename(line) for line in lines], [-1] * len(lines),
                   "listing")


def _entry(fs: pafs.FileSystem, line: str, here: str, source: str) -> str:
    """A listing's line as a path on ``fs``."""
    if is_uri(line):
        other, path = _filesystem(line)
        if other.type_name != fs.type_name:
            raise SourceError(f"{source}: {line} is on another filesystem than the listing's "
                              f"first entry ({fs.type_name}); list one filesystem per listing")
        return path
    if fs.type_name == "local":
        return str(Path(here, line).resolve())
    return posixpath.join(here, line)
