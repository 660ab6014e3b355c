"""Datasets for classic distillation: Fashion-MNIST from its IDX files, scikit-learn's digits,
a labelled-fraction split, and a content fingerprint so caches know what data they describe."""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IGNORE_INDEX = -100
"""Label of an example the student may not see the label of (the teacher still labels it)."""


class DataError(ValueError):
    """A dataset could not be found or read; the message says which file and what to do."""


@dataclass
class Splits:
    """Train, validation and test sets of one task, with its class names."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]


def _read_idx(path: Path, header: int) -> np.ndarray:
    if not path.exists():
        raise DataError(
            f"{path} does not exist. Install Debian's 'dataset-fashion-mnist' package "
            "(apt-get install dataset-fashion-mnist) or pass --data-dir with the four IDX files."
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


def split_off(ds: TensorDataset, n_val: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Split a TensorDataset into (rest, val) with a seeded permutation."""
    n = len(ds)
    if not 0 < n_val < n:
        raise DataError(f"val_size={n_val} must be between 1 and {n - 1} for a set of {n} examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x, y = ds.tensors
    rest, val = perm[n_val:].sort().values, perm[:n_val].sort().values
    return TensorDataset(x[rest], y[rest]), TensorDataset(x[val], y[val])


def hide_labels(ds: TensorDataset, fraction: float, seed: int) -> TensorDataset:
    """Keep the labels of a stratified ``fraction`` of examples; the others get ``IGNORE_INDEX``.

    The inputs are all kept: a teacher can still label them (the transfer set).
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"labelled_fraction={fraction} must be in (0, 1]")
    x, y = ds.tensors
    if fraction == 1.0:
        return TensorDataset(x, y.clone())
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        k = max(1, round(fraction * len(idx)))
        keep[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
    return TensorDataset(x, torch.where(keep, y, torch.full_like(y, IGNORE_INDEX)))


def labelled_only(ds: TensorDataset) -> TensorDataset:
    """The examples of ``ds`` whose label is not ``IGNORE_INDEX``."""
    x, y = ds.tensors
    keep = y != IGNORE_INDEX
    return TensorDataset(x[keep], y[keep])


def load_splits(
    name: str, *, data_dir: str | None = None, val_size: int = 5000, seed: int = 0
) -> Splits:
    """Train/validation/test splits of a built-in task: ``fashion-mnist`` or ``digits``.

    The validation set is carved out of the training set with ``seed``; the test set is untouched.
    """
    if name == "fashion-mnist":
        train, test = load_fashion_mnist(data_dir)
        train, val = split_off(train, val_size, seed)
        return Splits(train, val, test, FASHION_MNIST_CLASSES, (1, 28, 28))
    if name == "digits":
        x, y = load_digits_tensors()
        full = TensorDataset(x, y)
        n_test = len(full) // 5
        rest, test = split_off(full, n_test, seed + 1)
        train, val = split_off(rest, min(val_size, len(rest) // 5), seed)
        return Splits(train, val, test, tuple(str(i) for i in range(10)), (1, 8, 8))
    raise DataError(f"unknown dataset {name!r}; built-in datasets are 'fashion-mnist' and 'digits'")


def fingerprint(ds: Dataset, inputs_only: bool = False) -> str:
    """SHA-256 of a dataset's content (inputs and labels, in order), as a hex string.

    With ``inputs_only`` the labels are left out: a teacher's outputs depend on the inputs alone,
    so one cache serves every labelling of the same inputs. TensorDatasets are hashed from their
    tensors directly; other datasets item by item.
    """
    h = hashlib.sha256()
    if isinstance(ds, TensorDictDataset):
        for name, t in sorted(ds.tensors.items()):
            if not inputs_only or name != "label":
                h.update(name.encode())
                _hash_tensor(h, t)
        return h.hexdigest()
    if isinstance(ds, TensorDataset):
        for t in ds.tensors[:1] if inputs_only else ds.tensors:
            _hash_tensor(h, t)
        return h.hexdigest()
    h.update(str(len(ds)).encode())  # type: ignore[arg-type]
    for i in range(len(ds)):  # type: ignore[arg-type]
        item = ds[i]
        parts = item if isinstance(item, (tuple, list)) else (item,)
        for t in parts[:1] if inputs_only else parts:
            _hash_tensor(h, torch.as_tensor(t))
    return h.hexdigest()


def _hash_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


class TensorDictDataset(Dataset):
    """Named tensors with the same first dimension; a batch holds each of them by name
    (``input_ids``, ``attention_mask``, …), indexed in one operation.

    With ``trim_by`` naming a right-padded ``(N, L)`` attention mask, each batch is cut to its
    longest real row: every ``(n, L, …)`` tensor loses the trailing columns that are padding in
    all of the batch's rows, so short examples do not pay for the longest one in the dataset.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], trim_by: str | None = None) -> None:
        sizes = {k: len(v) for k, v in tensors.items()}
        if not tensors or len(set(sizes.values())) != 1:
            raise ValueError(f"TensorDictDataset needs tensors of one length, got {sizes}")
        if trim_by is not None and (trim_by not in tensors or tensors[trim_by].dim() != 2):
            raise ValueError(f"trim_by={trim_by!r} must name an (N, L) tensor of the dataset")
        self.tensors = tensors
        self.trim_by = trim_by

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at ``index`` by name, trimmed as described above, plus ``index``."""
        batch = {k: v[index] for k, v in self.tensors.items()}
        if self.trim_by is not None:
            full = batch[self.trim_by].shape[1]
            real = batch[self.trim_by].any(dim=0).nonzero()
            keep = int(real.max()) + 1 if len(real) else 1
            if keep < full:
                batch = {
                    k: v[:, :keep] if v.dim() >= 2 and v.shape[1] == full else v
                    for k, v in batch.items()
                }
        return {**batch, "index": index}

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def make_batch(dataset: Dataset, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The examples at ``index`` as a batch dict ``{"input", "label", "index"}``.

    TensorDatasets are indexed in one operation; TensorDictDatasets too, giving their names;
    other datasets item by item, each item being ``(input, label)`` or an input alone.
    """
    if isinstance(dataset, TensorDictDataset):
        return dataset.batch(index)
    if isinstance(dataset, TensorDataset):
        tensors = [t[index] for t in dataset.tensors]
    else:
        from torch.utils.data import default_collate

        items = [dataset[int(i)] for i in index]
        if isinstance(items[0], (tuple, list)):
            tensors = list(default_collate(items))
        else:
            tensors = [default_collate(items)]
    batch = {"input": tensors[0], "index": index}
    if len(tensors) > 1:
        batch["label"] = tensors[1]
    return batch


def iterate_batches(dataset: Dataset, order: torch.Tensor, batch_size: int, start: int = 0):
    """Yield batches of ``dataset`` in ``order``, ``batch_size`` examples each (the last may be
    smaller), beginning at batch number ``start``."""
    for lo in range(start * batch_size, len(order), batch_size):
        yield make_batch(dataset, order[lo : lo + batch_size])


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)
