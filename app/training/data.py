"""Training data: Fashion-MNIST from the Debian package's IDX files, or an ImageFolder tree."""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from app.model.card import InputSpec
from app.nn.tensors import decode_image_bytes, to_input_size

FASHION_MNIST_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("/usr/share/fashion-mnist"),
)
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
# what app.serving.upload_checks accepts (app.model.decode decodes both)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic",
                  ".heif", ".avif"}


class DataError(ValueError):
    pass


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: not a uint8 IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {dims} values, found {data.size}")
    return data.reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no {stem}[.gz]")


def find_fashion_mnist(spec: str = "fashion-mnist") -> Path:
    candidates = list(FASHION_MNIST_DIRS) if spec == "fashion-mnist" else [Path(spec)]
    for root in candidates:
        try:
            _idx_file(root, "train-images-idx3-ubyte")
            return root
        except DataError:
            continue
    raise DataError(
        f"Fashion-MNIST IDX files not found in {[str(c) for c in candidates]}; install them with "
        "'apt-get install -y dataset-fashion-mnist' or pass --data DIR"
    )


@dataclass
class Split:
    """Images as uint8 (N, C, H, W) in memory, or as file paths decoded on demand."""

    labels: Tensor
    images: Tensor | None = None
    paths: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> Split:
        images = self.images[index] if self.images is not None else None
        paths = [self.paths[i] for i in index.tolist()] if self.paths else []
        return Split(labels=self.labels[index], images=images, paths=paths)


@dataclass
class DataBundle:
    train: Split
    test: Split
    labels: list[str]
    channels: int
    mean: list[float]
    std: list[float]
    fingerprint: dict[str, str]
    source: str


def _fingerprint(files: Sequence[Path]) -> dict[str, str]:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return {"sha256": h.hexdigest(), "files": str(len(files))}


def load_fashion_mnist(spec: str) -> DataBundle:
    root = find_fashion_mnist(spec)
    files = {s: _idx_file(root, s) for s in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def split(prefix: str) -> Split:
        images = torch.from_numpy(read_idx(files[f"{prefix}-images-idx3-ubyte"]).copy())
        labels = torch.from_numpy(read_idx(files[f"{prefix}-labels-idx1-ubyte"]).astype(np.int64))
        return Split(labels=labels, images=images.unsqueeze(1))

    return DataBundle(
        train=split("train"), test=split("t10k"), labels=list(FASHION_MNIST_LABELS), channels=1,
        mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD],
        fingerprint=_fingerprint(list(files.values())), source=f"fashion-mnist:{root}",
    )


def scan_image_folder(root: Path, classes: list[str] | None = None) -> tuple[Split, list[str]]:
    """One sub-folder per class, image files inside (the torchvision ImageFolder layout)."""
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    paths: list[Path] = []
    labels: list[int] = []
    for idx, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                paths.append(f)
                labels.append(idx)
    if not paths:
        raise DataError(f"{root}: no images with suffixes {sorted(IMAGE_SUFFIXES)}")
    return Split(labels=torch.tensor(labels, dtype=torch.int64), paths=paths), classes


def load_image_folder(spec: str, test_spec: str | None, channels: int) -> DataBundle:
    root = Path(spec)
    train_root, test_root = root, Path(test_spec) if test_spec else None
    if test_root is None and (root / "train").is_dir() and (root / "test").is_dir():
        train_root, test_root = root / "train", root / "test"
    if test_root is None:
        raise DataError(f"{root}: ImageFolder data needs a test split: ROOT/train + ROOT/test, "
                        "or --data-test DIR")
    train, classes = scan_image_folder(train_root)
    test, _ = scan_image_folder(test_root, classes)
    mean, std = ([0.5], [0.25]) if channels == 1 else ([0.485, 0.456, 0.406],
                                                     [0.229, 0.224, 0.225])
    return DataBundle(
        train=train, test=test, labels=classes, channels=channels, mean=mean, std=std,
        fingerprint=_fingerprint(train.paths + test.paths), source=f"imagefolder:{root}",
    )


def load_data(spec: str, test_spec: str | None, channels: int) -> DataBundle:
    path = Path(spec)
    if spec == "fashion-mnist" or (path.is_dir() and any(path.glob("train-images-idx3-ubyte*"))):
        return load_fashion_mnist(spec)
    if path.is_dir():
        return load_image_folder(spec, test_spec, channels)
    raise DataError(f"{spec}: not 'fashion-mnist', an IDX directory or an ImageFolder root")


def split_holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """A seeded, stratified-enough random hold-out (the validation set of claim 6)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=g)
    n_val = max(1, round(len(split) * fraction))
    return split.subset(order[n_val:]), split.subset(order[:n_val])


class ImageDataset(Dataset[tuple[Tensor, int]]):
    """Yields (uint8 (C, size, size), label); the transform (augmentation, or none) follows.

    Image files are loaded exactly as the service prepares an upload (app.model.decode: decoded at
    the size needed, EXIF orientation applied, colour and the card's resize rule), so users' own
    photos train as they are served; in-memory images of another size get the same resize."""

    def __init__(self, split: Split, spec: InputSpec,
                 transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.split = split
        self.spec = spec
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self.split.images is not None:
            image = to_input_size(self.split.images[i], self.spec)
        else:
            try:
                image = decode_image_bytes(self.split.paths[i].read_bytes(), self.spec)
            except ValueError as e:
                raise DataError(f"{self.split.paths[i]}: {e}") from e
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.split.labels[i])
