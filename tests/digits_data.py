"""Real labelled images for fine-tuning tests without any download: scikit-learn's 8x8 handwritten
digits (1797 images, 10 classes), written as IDX files like Fashion-MNIST's and converted by the
project's own Fashion-MNIST writer."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding: 0, 0, type 0x08 (ubyte), ndim, then big-endian uint32 dims, then data."""
    assert arr.dtype == np.uint8
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * 15).astype(np.uint8), d.target.astype(np.uint8)  # 0..16 -> 0..240


def write_digits_idx(dst: Path, n_train: int, n_val: int) -> tuple[np.ndarray, np.ndarray]:
    """train-* and t10k-* IDX .gz pairs in `dst`; returns the images and labels written (train first)."""
    images, labels = digits_arrays()
    parts = {"train": slice(0, n_train), "t10k": slice(n_train, n_train + n_val)}
    for split, sl in parts.items():
        (dst / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images[sl])))
        (dst / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[sl])))
    return images[: n_train + n_val], labels[: n_train + n_val]
