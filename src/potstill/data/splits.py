"""Train / validation / test splits of labelled sets (tensors, or image tables read batch by
batch): a seeded validation split, a stratified labelled fraction (the other labels hidden, the
inputs kept for the teacher), the labelled part."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


def labels_of(ds: Dataset) -> torch.Tensor:
    """The labels of a labelled set: a TensorDataset's second tensor, or a table's
    ``labels`` (:class:`~potstill.data.image_tables.ImageTable`)."""
    return ds.tensors[1] if isinstance(ds, TensorDataset) else ds.labels  # type: ignore[attr-defined]


def take(ds: Dataset, index: torch.Tensor) -> Dataset:
    """The examples of a labelled set at ``index``, in that order."""
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[index] for t in ds.tensors))
    return ds.select(index)  # type: ignore[attr-defined]


def relabel(ds: Dataset, labels: torch.Tensor) -> Dataset:
    """The same inputs with other labels."""
    if isinstance(ds, TensorDataset):
        return TensorDataset(ds.tensors[0], labels)
    return ds.relabel(labels)  # type: ignore[attr-defined]


def split_off(ds: Dataset, n_val: int, seed: int) -> tuple[Dataset, Dataset]:
    """Split a labelled set into (rest, val) with a seeded permutation."""
    n = len(ds)  # type: ignore[arg-type]
    if not 0 < n_val < n:
        raise DataError(f"val_size={n_val} must be between 1 and {n - 1} for a set of {n} examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rest, val = perm[n_val:].sort().values, perm[:n_val].sort().values
    return take(ds, rest), take(ds, val)


def hide_labels(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """Keep the labels of a stratified ``fraction`` of examples; the others get ``IGNORE_INDEX``.

    The inputs are all kept: a teacher can still label them (the transfer set).
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"labelled_fraction={fraction} must be in (0, 1]")
    y = labels_of(ds)
    if fraction == 1.0:
        return relabel(ds, y.clone())
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        k = max(1, round(fraction * len(idx)))
        keep[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
    return relabel(ds, torch.where(keep, y, torch.full_like(y, IGNORE_INDEX)))


def labelled_only(ds: Dataset) -> Dataset:
    """The examples of ``ds`` whose label is not ``IGNORE_INDEX``."""
    return take(ds, (labels_of(ds) != IGNORE_INDEX).nonzero().flatten())


def load_splits(
    name: str,
    *,
    data_dir: str | None = None,
    val_size: int = 5000,
    seed: int = 0,
    columns: Mapping[str, str] | None = None,
    rows: Mapping[str, Any] | None = None,
) -> Splits:
    """Train / validation / test splits for the classifier task from the data source ``name``
    (see :data:`potstill.data.sources.SOURCES`): ``columns`` maps the task's ``input`` and
    ``label`` to the source's columns (default ``image`` and ``label``).

    The validation set is carved out of the training rows with ``seed``; a source's own test
    split is kept untouched, and a source without one (digits) gives a fifth of its rows to the
    test set first (with ``seed + 1``). ``rows``: the source's splits, already loaded: Rows, or
    labelled sets read batch by batch (the :class:`~potstill.data.image_tables.ImageTable` s
    of :func:`~potstill.data.image_tables.image_tables`, from the user's image folder)."""
    if rows is None:
        options = {"data_dir": data_dir} if data_dir is not None else {}
        rows = load_rows(name, **options)
    mapping = dict(columns or {"input": "image", "label": "label"})

    def tensors(r: Any) -> Dataset:
        if not isinstance(r, Rows):
            return r  # a labelled set already (an image table)
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
        classes = tuple(str(c) for c in sorted(set(labels_of(train).tolist())))
    if shape is None:
        shape = tuple(train[0][0].shape)
    return Splits(train, val, test, tuple(classes), tuple(shape))
