"""Built-in image corpora as data sources: Fashion-MNIST from its IDX files (Debian's
dataset-fashion-mnist) and scikit-learn's 8×8 digits, rows of ``image`` and ``label``."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .rows import DataError, Rows

#: Where the four IDX files are: ``$FMNIST_DIR``, else where Debian's
#: ``dataset-fashion-mnist`` package puts them.
FASHION_MNIST_DIR = Path(os.environ.get("FMNIST_DIR") or "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _read_idx(path: Path, header: int) -> np.ndarray:
    if not path.exists():
        raise DataError(
            f"{path} does not exist. Install Debian's 'dataset-fashion-mnist' package "
            "(apt-get install dataset-fashion-mnist), or give the folder of the four IDX files "
            "with --data-dir (data.data_dir) or the FMNIST_DIR environment variable."
        )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path} is not a readable gzip IDX file: {e}") from e
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST as ``(train, test)`` TensorDatasets of images in [0, 1] of shape (1, 28, 28).

    ``data_dir`` holds ``train-images-idx3-ubyte.gz`` and its three siblings; by default the
    Debian package's folder.
    """
    d = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    out = []
    for split in ("train", "t10k"):
        images = _read_idx(d / f"{split}-images-idx3-ubyte.gz", 16)
        labels = _read_idx(d / f"{split}-labels-idx1-ubyte.gz", 8)
        if images.size != labels.size * 784:
            raise DataError(
                f"{d}: {split} images hold {images.size} bytes for {labels.size} labels "
                "(expected 784 bytes per label); the files are damaged or mismatched."
            )
        x = torch.from_numpy(images.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
        y = torch.from_numpy(labels.astype(np.int64))
        out.append(TensorDataset(x, y))
    return out[0], out[1]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits as float images in [0, 1] of shape (1, 8, 8) and int labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def fashion_mnist_rows(data_dir: str | os.PathLike | None = None) -> dict[str, Rows]:
    """Fashion-MNIST as a data source: ``train`` (60,000) and ``test`` (10,000) rows with columns
    ``image`` ((1, 28, 28) floats in [0, 1]) and ``label``."""
    meta = {"classes": FASHION_MNIST_CLASSES, "input_shape": (1, 28, 28)}
    train, test = load_fashion_mnist(data_dir)
    return {
        split: Rows({"image": ds.tensors[0], "label": ds.tensors[1]}, "fashion-mnist", meta)
        for split, ds in (("train", train), ("test", test))
    }


def digits_rows(data_dir: str | os.PathLike | None = None) -> dict[str, Rows]:
    """scikit-learn's digits as a data source: ``all`` 1,797 rows with columns ``image``
    ((1, 8, 8) floats in [0, 1]) and ``label`` (no test split of its own). They come inside
    scikit-learn: ``data_dir`` is not read."""
    x, y = load_digits_tensors()
    meta = {"classes": tuple(str(i) for i in range(10)), "input_shape": (1, 8, 8)}
    return {"all": Rows({"image": x, "label": y}, "digits", meta)}
