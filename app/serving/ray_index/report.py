"""What the driver makes of the pipeline's output: the tally, the failure report, the summary
and its JSON line, and the optional Parquet file (id, filename, label, score, vector)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from app.model.calibration import softmax
from app.model.card import ModelCard

if TYPE_CHECKING:
    import pyarrow as pa  # noqa: F401
    import pyarrow.parquet as pq

log = logging.getLogger("imgrec.index")

SHOWN_FAILURES = 20  # failures the summary names; the report file has them all


@dataclass
class Tally:
    key: str = ""  # the store key written under
    files: int = 0  # rows seen: every listed file, once
    stored: int = 0  # embedded and written by this run
    skipped: int = 0  # already stored: by an earlier run, or another file with the same bytes
    failed: int = 0  # unreadable: read error, too large, refused by the upload checks
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0

    def json_line(self, **extra: Any) -> str:
        """The figures for scripts, on one line."""
        return json.dumps({"files": self.files, "stored": self.stored, "skipped": self.skipped,
                           "failed": self.failed, "images_per_s": round(self.images_per_s, 1),
                           "seconds": round(self.seconds, 3), "store_key": self.key, **extra})

    def summary(self) -> str:
        return (f"indexed {self.stored} images, {self.skipped} already stored, {self.failed} "
                f"unreadable, of {self.files} files in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s) into {self.key[:12]}…")


class FailureReport:
    """Each unreadable file with its reason: logged (the first SHOWN_FAILURES), and as JSON
    lines ({"path", "filename", "reason"}) in the report file when one was asked for."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.count = 0
        self._out: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._out = path.open("w", encoding="utf-8")

    def add(self, path: str, filename: str | None, reason: str) -> None:
        self.count += 1
        if self.count <= SHOWN_FAILURES:
            log.warning("%s: skipped: %s", path, reason)
        elif self.count == SHOWN_FAILURES + 1:
            log.warning("more unreadable files: %s", self.path or "pass --report FILE to list "
                        "them all")
        if self._out is not None:
            self._out.write(json.dumps({"path": path, "filename": filename,
                                        "reason": reason}) + "\n")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


class Classifier:
    """The model's classifier (``fc``, the layer after the feature vector) in numpy: the label
    and score of a vector stored by an earlier run, for its Parquet row. For vectors of the
    float32 graph these are the network's own within float rounding (its logits are this same
    product); for int8 or bf16 vectors, the float32 classifier's on them."""

    def __init__(self, model_dir: Path, card: ModelCard) -> None:
        from safetensors.numpy import load_file

        from app.model.directory import WEIGHTS_FILE

        weights = load_file(str(model_dir / WEIGHTS_FILE))
        self.weight = weights["fc.weight"].astype(np.float32)
        self.bias = weights["fc.bias"].astype(np.float32)
        self.labels = card.labels
        # the served scores' temperature, so a stored vector's score is what /predict said
        self.temperature = card.calibration.temperature if card.calibration is not None else 1.0

    def __call__(self, vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
        probs = softmax(vectors @ self.weight.T + self.bias, self.temperature)
        top = probs.argmax(axis=1)
        return [self.labels[t] for t in top], probs[np.arange(len(top)), top]


class ParquetRows:
    """One row per stored file, streamed in row groups as batches arrive (the driver never
    holds the catalogue's vectors), into ``<path>.partial``, renamed to ``path`` when the run
    ends: a killed run leaves no half file under the name asked for."""

    def __init__(self, path: Path, dim: int, classifier: Classifier) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.dim, self.classifier = path, dim, classifier
        self.partial = path.with_name(path.name + ".partial")
        self.schema = pa.schema([("id", pa.string()), ("filename", pa.string()),
                                 ("label", pa.string()), ("score", pa.float32()),
                                 ("vector", pa.list_(pa.float32(), dim))])
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.partial, self.schema)
        self.rows = 0

    def add(self, ids: list[str], names: list[str | None], labels: list[str | None],
            scores: list[float | None], vectors: list[bytes]) -> None:
        import pyarrow as pa

        if not ids:
            return
        matrix = np.frombuffer(b"".join(vectors), "<f4").reshape(len(ids), self.dim)
        missing = [n for n, label in enumerate(labels) if label is None]
        if missing:  # vectors stored by an earlier run: their label from the classifier
            names_, probs = self.classifier(matrix[missing])
            labels, scores = list(labels), list(scores)
            for n, label, score in zip(missing, names_, probs, strict=True):
                labels[n], scores[n] = label, float(score)
        table = pa.table({
            "id": pa.array(ids, pa.string()), "filename": pa.array(names, pa.string()),
            "label": pa.array(labels, pa.string()), "score": pa.array(scores, pa.float32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel(), pa.float32()),
                                                        self.dim)}, schema=self.schema)
        assert self._writer is not None
        self._writer.write_table(table)
        self.rows += len(ids)

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            os.replace(self.partial, self.path)

    def abandon(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
