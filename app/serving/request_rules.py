"""The bounds a request's parameters must keep, written once for every protocol.

Pure functions, no I/O: the Service applies them, and the skins that want to refuse early (the
fast path, before reading a body) call the same ones. Each raises the Service's own
``InvalidParameter`` / ``TooLarge`` (app/serving/errors.py).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import numpy as np

from app.serving.errors import BadRequest, InvalidParameter, TooLarge

SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA256_ANY_CASE = "^[0-9a-fA-F]{64}$"  # what a client may send; ids are lower-cased first
# 100 ids are a 6.8 kB query: within nginx's default 8 kB request line and uvicorn's (httptools)
# header limit. 1000 (68 kB) were refused by the HTTP parser before reaching any route.
MAX_LOOKUP_IDS = 100
MAX_K = 100  # neighbours per searched image
MAX_FILENAME_CHARS = 255


def image_count(n: int, max_files: int) -> int:
    """1..max_files images per request."""
    if n < 1:
        raise BadRequest("no image in the request", code="no_file")
    if n > max_files:
        raise TooLarge(f"{n} images; at most {max_files} per request (IMGREC_MAX_FILES)",
                       code="too_many_files")
    return n


def top_k(k: int, classes: int) -> int:
    """Labels per image: 1..the model's classes."""
    if not 1 <= k <= classes:
        raise InvalidParameter(f"top_k: must be between 1 and {classes} (the model's classes)")
    return k


def neighbours(k: int) -> int:
    """Neighbours per searched image: 1..MAX_K."""
    if not 1 <= k <= MAX_K:
        raise InvalidParameter(f"k: must be between 1 and {MAX_K}")
    return k


def image_ids(ids: Iterable[str]) -> list[str]:
    """Lower-cased sha256 hex ids, 1..MAX_LOOKUP_IDS of them, in the order given."""
    out = [i.lower() for i in ids]
    if not out:
        raise InvalidParameter("id: at least one id")
    if len(out) > MAX_LOOKUP_IDS:
        raise InvalidParameter(f"id: at most {MAX_LOOKUP_IDS} ids per request")
    bad = [i for i in out if not SHA256.match(i)]
    if bad:
        raise InvalidParameter(f"id: not a sha256 hex digest: {', '.join(bad[:5])}")
    return out


def clean_filename(name: str | None) -> str | None:
    """A client's filename as it may be stored and shown: no control or format characters, no
    surrounding blanks, at most MAX_FILENAME_CHARS characters; None when nothing is left."""
    if name is None:
        return None
    kept = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf", "Cs"))
    kept = kept.strip()[:MAX_FILENAME_CHARS]
    return kept or None


def unit(v: np.ndarray) -> np.ndarray:
    """The vector scaled to unit length (a zero vector stays zero)."""
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v
