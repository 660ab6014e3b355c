"""Images from the user's own table as a classic data source: an image folder (one subfolder per
class, optionally inside ``train/`` and ``test/``), a ``save_to_disk`` folder or a hub dataset
with an image and a label column, decoded into float tensors in [0, 1] of shape ``(C, H, W)``
— the form of the built-in Fashion-MNIST rows, so every classic recipe (built-in MLPs and CNNs)
trains on them the same way."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .labels import LABEL_COLUMNS
from .rows import DataError, Rows
from .tables import find_column, load_table_splits

log = logging.getLogger("potstill")

IMAGE_COLUMNS = ("image", "img", "picture", "pixel_values")


def _array(image: Any, mode: str | None, size: tuple[int, int] | None) -> np.ndarray:
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]))
    a = np.asarray(image, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def image_rows(
    *,
    columns: dict[str, str] | None = None,
    mode: str | None = None,
    size: tuple[int, int] | list[int] | None = None,
    **source: Any,
) -> dict[str, Rows]:
    """The splits of an image table (``source``: the options of
    :func:`~potstill.data.tables.load_table_splits`) as rows of ``image`` ((C, H, W) floats in
    [0, 1]) and ``label``. ``mode`` converts every image first (``L``: grayscale, ``RGB``);
    ``size`` ([H, W]) resizes; without it all images must have the first image's size."""
    cols = dict(columns or {})
    tables = load_table_splits(**source)
    train = tables["train"]
    image_col = find_column(train, "image", cols.get("input") or cols.get("image"),
                            IMAGE_COLUMNS, "data")  # fmt: skip
    label_col = find_column(train, "label", cols.get("label"), LABEL_COLUMNS, "data")
    names = getattr(train.features.get(label_col), "names", None)
    if names is None:
        raise DataError(
            f"data: the label column {label_col!r} has no class names (an image folder gives "
            "them); use an image folder, or a table whose label column is a ClassLabel"
        )
    out: dict[str, Rows] = {}
    shape = None
    for split, table in tables.items():
        if getattr(table.features.get(label_col), "names", None) != names:
            raise DataError(f"data: the {split} split's classes differ from train's ({names})")
        x = image_tensor(table[image_col], mode=mode, size=size, shape=shape, split=split)
        shape = tuple(x.shape[1:])
        y = torch.tensor(list(table[label_col]), dtype=torch.int64)
        out[split] = Rows({"image": x, "label": y}, "images",
                          {"classes": tuple(names), "input_shape": shape})  # fmt: skip
    if "test" not in out:
        out = {"all": out.pop("train"), **out}
    return out


def image_tensor(
    images: Iterable[Any],
    *,
    mode: str | None = None,
    size: Sequence[int] | None = None,
    shape: tuple[int, ...] | None = None,
    split: str = "train",
    fix: str = "set data.source size: [H, W] (and mode: L or RGB)",
) -> torch.Tensor:
    """PIL images as one float tensor in [0, 1] of shape ``(N, C, H, W)``, each converted to
    ``mode`` and resized to ``size`` ([H, W]) first when given; every image must have the
    first one's shape (or ``shape``), else a DataError says which and how to ``fix`` it."""
    want = (int(size[0]), int(size[1])) if size is not None else None
    arrays = []
    for i, image in enumerate(images):
        a = _array(image, mode, want)
        if shape is None:
            shape = a.shape
        elif a.shape != shape:
            raise DataError(
                f"data: {split} image {i} has shape {a.shape} but the first image {shape}; "
                f"{fix} to make them alike"
            )
        arrays.append(a)
    if not arrays:
        raise DataError(f"data: the {split} split has no images")
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)
