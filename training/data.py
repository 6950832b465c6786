"""Bundled data sets: MNIST IDX files and tiny shakespeare (see data/README.md for provenance)."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
MNIST_DIR = DATA_DIR / "mnist"
SHAKESPEARE = DATA_DIR / "tinyshakespeare.txt"

TRAIN_COUNT = 9000  # first 9000 t10k images train; the last 1000 are held out
VAL_COUNT = 500  # last 500 of the training split steer early stopping


class DataError(Exception):
    """Raised when a data file is missing or is not what it claims to be; names the file."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 2049 (labels) or 2051 (images)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: cannot be read as an IDX file: {e}") from e
    if len(raw) < 8:
        raise DataError(f"{path}: too short for an IDX header")
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 2049:
        dims: tuple[int, ...] = (count,)
        offset = 8
    elif magic == 2051:
        if len(raw) < 16:
            raise DataError(f"{path}: too short for an IDX image header")
        rows, cols = struct.unpack(">II", raw[8:16])
        dims, offset = (count, rows, cols), 16
    else:
        raise DataError(f"{path}: magic number {magic} is neither 2049 (labels) nor 2051 (images)")
    n = int(np.prod(dims))
    if len(raw) - offset != n:
        raise DataError(f"{path}: header promises {n} bytes of data, file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise DataError(f"{folder}: no {stem}[.gz] found (expected standard MNIST IDX file names)")


@dataclass(frozen=True)
class ImageSplit:
    """Images as float32 in [0, 1], shape (N, 784), and labels int64, shape (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _to_split(images: np.ndarray, labels: np.ndarray) -> ImageSplit:
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return ImageSplit(x, torch.from_numpy(labels.astype(np.int64)))


def load_t10k() -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(_find(MNIST_DIR, "mnist-t10k-images-idx3-ubyte"))
    labels = read_idx(_find(MNIST_DIR, "mnist-t10k-labels-idx1-ubyte"))
    return images, labels


@dataclass(frozen=True)
class MNISTSplits:
    train: ImageSplit
    val: ImageSplit  # early stopping
    heldout: ImageSplit  # every reported figure


def load_mnist(data_dir: Path | None = None) -> MNISTSplits:
    """The project's MNIST splits; ``data_dir`` (a folder of the 60k IDX files) replaces training data."""
    images, labels = load_t10k()
    heldout = _to_split(images[TRAIN_COUNT:], labels[TRAIN_COUNT:])
    if data_dir is None:
        tr_images, tr_labels = images[:TRAIN_COUNT], labels[:TRAIN_COUNT]
    else:
        tr_images = read_idx(_find(data_dir, "train-images-idx3-ubyte"))
        tr_labels = read_idx(_find(data_dir, "train-labels-idx1-ubyte"))
        if tr_images.shape[1:] != (28, 28) or len(tr_images) != len(tr_labels):
            raise DataError(f"{data_dir}: images {tr_images.shape} and labels {tr_labels.shape} do not match")
    n_val = VAL_COUNT if data_dir is None else min(5000, len(tr_images) // 10)
    if len(tr_images) - n_val < 1:
        raise DataError(f"{data_dir}: {len(tr_images)} training images leave none to train on")
    return MNISTSplits(
        train=_to_split(tr_images[:-n_val], tr_labels[:-n_val]),
        val=_to_split(tr_images[-n_val:], tr_labels[-n_val:]),
        heldout=heldout,
    )


@dataclass(frozen=True)
class TextSplits:
    vocab: str  # sorted distinct characters; a token id is an index into it
    train: torch.Tensor  # int64 ids
    val: torch.Tensor


def load_shakespeare(path: Path = SHAKESPEARE) -> TextSplits:
    """Tiny shakespeare, first 90% train, last 10% validation."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text: {e}") from e
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    n = int(0.9 * len(ids))
    return TextSplits(vocab=vocab, train=ids[:n], val=ids[n:])
