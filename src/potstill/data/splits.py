"""Train / validation / test splits of labelled tensors: a seeded validation split, a stratified
labelled fraction (the other labels hidden, the inputs kept for the teacher), the labelled part."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

from .rows import DataError, Rows
from .sources import load_rows

IGNORE_INDEX = -100
"""Label of an example the student may not see the label of (the teacher still labels it)."""


@dataclass
class Splits:
    """Train, validation and test sets of one task, with its class names."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]


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
    name: str,
    *,
    data_dir: str | None = None,
    val_size: int = 5000,
    seed: int = 0,
    columns: Mapping[str, str] | None = None,
    rows: Mapping[str, Rows] | None = None,
) -> Splits:
    """Train / validation / test splits for the classifier task from the data source ``name``
    (see :data:`potstill.data.sources.SOURCES`): ``columns`` maps the task's ``input`` and
    ``label`` to the source's columns (default ``image`` and ``label``).

    The validation set is carved out of the training rows with ``seed``; a source's own test
    split is kept untouched, and a source without one (digits) gives a fifth of its rows to the
    test set first (with ``seed + 1``). ``rows``: the source's rows, already loaded (e.g. by
    :func:`potstill.data.image_tables.image_rows` from the user's image folder)."""
    if rows is None:
        options = {"data_dir": data_dir} if data_dir is not None else {}
        rows = load_rows(name, **options)
    mapping = dict(columns or {"input": "image", "label": "label"})

    def tensors(r: Rows) -> TensorDataset:
        f = r.fields(mapping)
        return TensorDataset(f["input"], f["label"])

    first = next(iter(rows.values()))
    classes, shape = first.meta.get("classes"), first.meta.get("input_shape")
    if "test" in rows:
        train, val = split_off(tensors(rows["train"]), val_size, seed)
        test = tensors(rows["test"])
    else:
        full = tensors(rows["all"])
        rest, test = split_off(full, len(full) // 5, seed + 1)
        train, val = split_off(rest, min(val_size, len(rest) // 5), seed)
    if classes is None:
        classes = tuple(str(c) for c in sorted(set(train.tensors[1].tolist())))
    if shape is None:
        shape = tuple(train.tensors[0].shape[1:])
    return Splits(train, val, test, tuple(classes), tuple(shape))
