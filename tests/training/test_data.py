"""Training data (training/data.py): IDX files read or refused, a --data-dir that replaces the bundled
images, and the command line on one."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.training.tiny_runs import train
from training.data import DataError, load_mnist, read_idx

pytestmark = pytest.mark.timeout(120)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">II", magic, len(array)) + (struct.pack(">II", *array.shape[1:]) if array.ndim == 3 else b"")
    return header + array.astype(np.uint8).tobytes()


def synthetic_mnist(folder: Path, n: int, gz: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


def test_read_idx_round_trip(tmp_path: Path) -> None:
    arr = np.arange(2 * 28 * 28, dtype=np.uint64).reshape(2, 28, 28) % 256
    (tmp_path / "i").write_bytes(idx_bytes(arr))
    (tmp_path / "l.gz").write_bytes(gzip.compress(idx_bytes(np.array([3, 7]))))
    assert np.array_equal(read_idx(tmp_path / "i"), arr)
    assert read_idx(tmp_path / "l.gz").tolist() == [3, 7]


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">II", 2052, 1) + b"\0" * 4)
    with pytest.raises(
        DataError, match="^" + str(path).replace(".", r"\.") + r": magic number 2052 is neither 2049 \(labels\) nor 2051 \(images\)$"
    ):
        read_idx(path)


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("short", b"\0\0\x08", r"too short for an IDX header$"),
        ("short-image", struct.pack(">II", 2051, 1) + b"\0\0", r"too short for an IDX image header$"),
        ("count", struct.pack(">II", 2049, 10) + b"\0" * 9, r"header promises 10 bytes of data, file holds 9$"),
        ("bad.gz", b"not gzip at all", r"cannot be read as an IDX file: "),
    ],
)
def test_read_idx_refuses(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match="^" + str(path).replace(".", r"\.") + ": " + reason):
        read_idx(path)


def test_data_dir_replaces_training_images(tmp_path: Path) -> None:
    images, labels = synthetic_mnist(tmp_path / "raw", 6000)
    splits = load_mnist(tmp_path / "raw")
    assert len(splits.train) + len(splits.val) == 6000
    assert len(splits.train) > 0 and len(splits.val) > 0
    both = torch.cat([splits.train.images, splits.val.images])
    assert torch.equal(both, torch.from_numpy(images.reshape(6000, 784).astype(np.float32) / 255.0))
    assert torch.cat([splits.train.labels, splits.val.labels]).tolist() == labels.tolist()
    assert len(splits.heldout) == 1000  # the bundled t10k tail still evaluates


def test_data_dir_gzipped(tmp_path: Path) -> None:
    images, _ = synthetic_mnist(tmp_path / "raw", 5100, gz=True)
    splits = load_mnist(tmp_path / "raw")
    assert len(splits.train) + len(splits.val) == 5100
    assert torch.equal(splits.train.images[0], torch.from_numpy(images[0].reshape(784).astype(np.float32) / 255.0))


def test_small_data_dir_keeps_a_training_split(tmp_path: Path) -> None:
    synthetic_mnist(tmp_path / "raw", 600)
    splits = load_mnist(tmp_path / "raw")
    assert len(splits.train) + len(splits.val) == 600
    assert len(splits.train) > 0 and len(splits.val) > 0


def test_data_dir_without_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="^" + str(tmp_path).replace(".", r"\.") + r": no train-images-idx3-ubyte\[\.gz\] found"):
        load_mnist(tmp_path)


def test_cli_trains_on_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic_mnist(tmp_path / "raw", 6000)
    expected_train = len(load_mnist(tmp_path / "raw").train)
    run = tmp_path / "run"
    assert train("vae", run, "--epochs", "1", "--data-dir", str(tmp_path / "raw")) == 0
    metrics: dict[str, Any] = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == -(-expected_train // 256)
    assert metrics["task_args"]["data_dir"] == str(tmp_path / "raw")


def test_cli_missing_data_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train("vae", tmp_path / "run", "--epochs", "1", "--data-dir", str(tmp_path / "empty")) == 2
    assert _error_line(capsys.readouterr().err).startswith(f"error: {tmp_path / 'empty'}: no train-images-idx3-ubyte")
