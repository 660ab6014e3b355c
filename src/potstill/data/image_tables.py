"""Images from the user's own table as a classic data source: an image folder (one subfolder per
class, optionally inside ``train/`` and ``test/``), a ``save_to_disk`` folder or a hub dataset
with an image and a label column. The table stays a memory-mapped Arrow table on disk: an
:class:`ImageTable` decodes only the rows of each batch, into float tensors in [0, 1] of shape
``(C, H, W)`` — the form of the built-in Fashion-MNIST rows, so every classic recipe (built-in
MLPs and CNNs, Hugging Face and torchvision image classifiers) trains on them the same way, and
a folder larger than memory never loads whole."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .labels import LABEL_COLUMNS
from .rows import DataError
from .tables import find_column, load_table_splits

if TYPE_CHECKING:
    from datasets import Dataset as Table

log = logging.getLogger("potstill")

IMAGE_COLUMNS = ("image", "img", "picture", "pixel_values")


_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
"""Image modes read as they are; any other (palette, CMYK, 16-bit, …) is converted to RGB."""


def _array(image: Any, mode: str | None, size: tuple[int, int] | None) -> np.ndarray:
    mode = mode or (image.mode if image.mode in _CHANNELS else "RGB")
    if image.mode != mode:
        image = image.convert(mode)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]))
    a = np.asarray(image, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _open(raw: dict[str, Any]) -> Any:
    """A PIL image, not decoded yet (only its header read), from an Arrow image cell."""
    from PIL import Image

    if raw.get("bytes") is not None:
        return Image.open(io.BytesIO(raw["bytes"]))
    return Image.open(raw["path"])


class ImageTable(Dataset):
    """The rows ``rows`` of an Arrow table's image column with their ``labels``, read batch by
    batch: ``batch(index)`` decodes those images only (converted to ``mode``, resized to
    ``size`` [H, W]) into ``{"input": (n, C, H, W) floats in [0, 1], "label", "index"}``, the
    classic batch. ``shape`` is every image's ``(C, H, W)`` (checked when the table is made:
    see :func:`image_table`). ``select`` and ``relabel`` make the subsets and labellings a run
    needs without copying an image."""

    def __init__(
        self,
        table: Table,
        column: str,
        labels: torch.Tensor,
        shape: tuple[int, ...],
        *,
        mode: str | None = None,
        size: tuple[int, int] | None = None,
        rows: torch.Tensor | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.table = table.select_columns([column])
        self.column = column
        self.rows = torch.arange(len(table)) if rows is None else rows
        if len(labels) != len(self.rows):
            raise ValueError(f"{len(labels)} labels for {len(self.rows)} images")
        self.labels = labels
        self.shape = tuple(shape)
        self.mode, self.size = mode, size
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.rows)

    def images(self, index: torch.Tensor) -> torch.Tensor:
        """The images at ``index`` (positions in this table) as ``(n, C, H, W)`` floats."""
        cells = self.table[self.rows[index].tolist()][self.column]
        return image_tensor(cells, mode=self.mode, size=self.size, shape=self.shape)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The classic batch of the rows at ``index``: ``input``, ``label`` and ``index``."""
        return {"input": self.images(index), "label": self.labels[index], "index": index}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images(torch.tensor([int(i)]))[0], self.labels[int(i)]

    def select(self, index: torch.Tensor) -> ImageTable:
        """The rows at ``index``, in that order (no image is read)."""
        return self._with(self.rows[index], self.labels[index])

    def relabel(self, labels: torch.Tensor) -> ImageTable:
        """The same images with other labels (hidden ones, another class order)."""
        return self._with(self.rows, labels)

    def _with(self, rows: torch.Tensor, labels: torch.Tensor) -> ImageTable:
        return ImageTable(self.table, self.column, labels, self.shape, mode=self.mode,
                          size=self.size, rows=rows, meta=self.meta)  # fmt: skip

    def content_fingerprint(self, inputs_only: bool = False) -> str:
        """SHA-256 of what the images are (their encoded bytes, in row order, with the mode and
        size they are read at) and, unless ``inputs_only``, the labels: what a teacher cache
        checks before it is reused. Read in blocks; no more than a block is held."""
        from datasets import Image

        h = hashlib.sha256(f"{len(self)} {self.mode} {self.size} {self.shape}".encode())
        raw = self.table.cast_column(self.column, Image(decode=False))
        order = self.rows.tolist()
        for lo in range(0, len(order), 1024):
            for cell in raw[order[lo : lo + 1024]][self.column]:
                data = cell.get("bytes")
                if data is None:
                    with open(cell["path"], "rb") as f:
                        data = f.read()
                h.update(hashlib.sha256(data).digest())
        if not inputs_only:
            h.update(self.labels.numpy().tobytes())
        return h.hexdigest()


def image_table(
    table: Table,
    column: str,
    labels: torch.Tensor,
    *,
    mode: str | None = None,
    size: Sequence[int] | None = None,
    shape: tuple[int, ...] | None = None,
    split: str = "train",
    fix: str = "set data.source size: [H, W] (and mode: L or RGB)",
    meta: dict[str, Any] | None = None,
) -> ImageTable:
    """An :class:`ImageTable` of ``table``'s image ``column``, after a check of every image's
    header (not its pixels): each must give the first one's (or ``shape``'s) channels and size
    once converted to ``mode`` and resized to ``size``, else a DataError names the image and
    how to ``fix`` it."""
    from datasets import Image

    if len(table) == 0:
        raise DataError(f"data: the {split} split has no images")
    want = (int(size[0]), int(size[1])) if size is not None else None
    raw = table.cast_column(column, Image(decode=False))
    for lo in range(0, len(table), 1024):
        for i, cell in enumerate(raw[lo : lo + 1024][column], lo):
            with _open(cell) as image:
                c = _CHANNELS.get(mode or image.mode, 3)
                h, w = want or (image.size[1], image.size[0])
            if shape is None:
                shape = (c, h, w)
            elif (c, h, w) != tuple(shape):
                raise DataError(
                    f"data: {split} image {i} has shape {(c, h, w)} but the first image "
                    f"{tuple(shape)}; {fix} to make them alike"
                )
    assert shape is not None
    return ImageTable(table, column, labels, shape, mode=mode, size=want, meta=meta)


def image_tables(
    *,
    columns: dict[str, str] | None = None,
    mode: str | None = None,
    size: tuple[int, int] | list[int] | None = None,
    **source: Any,
) -> dict[str, ImageTable]:
    """The splits of an image table (``source``: the options of
    :func:`~potstill.data.tables.load_table_splits`) as :class:`ImageTable` s of ``image``
    ((C, H, W) floats in [0, 1], read batch by batch) and ``label``, with the class names and
    the input shape in their ``meta``; ``train`` and ``test`` when the source has a test
    split, else ``all``. ``mode`` converts every image first (``L``: grayscale, ``RGB``);
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
    out: dict[str, ImageTable] = {}
    shape = None
    for split, table in tables.items():
        if getattr(table.features.get(label_col), "names", None) != names:
            raise DataError(f"data: the {split} split's classes differ from train's ({names})")
        y = torch.tensor(table.data.column(label_col).to_numpy(), dtype=torch.int64)
        out[split] = image_table(table, image_col, y, mode=mode, size=size, shape=shape,
                                 split=split, meta={"classes": tuple(names)})  # fmt: skip
        shape = out[split].shape
    for t in out.values():
        t.meta["input_shape"] = shape
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
