"""What a data source gives: the rows of each split, by column (tensors whose first dimension
counts the rows, or lists), and what the task reads is found by column name. A task maps its
fields to a source's columns (``{"input": "image", "label": "label"}``); a missing column is an
error that names the source, the column and the columns it has."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


class DataError(ValueError):
    """A dataset could not be found or read; the message says which file and what to do."""


Column = torch.Tensor | list[Any]


@dataclass
class Rows:
    """The rows of one split of data ``source``, by column (all of one length); ``meta`` holds
    what the source knows beyond its rows (class names, input shape)."""

    columns: dict[str, Column]
    source: str = "data"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {name: len(col) for name, col in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{self.source}: columns of different lengths {lengths}")

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def column(self, name: str) -> Column:
        """The column ``name``; DataError naming the columns there are when it is missing."""
        if name not in self.columns:
            raise DataError(
                f"{self.source} has no column {name!r}; its columns: {', '.join(self.columns)}"
            )
        return self.columns[name]

    def fields(self, mapping: Mapping[str, str]) -> dict[str, Column]:
        """The task's fields from this source's columns: ``{field: column}`` → ``{field:
        values}`` (e.g. ``{"input": "image", "label": "label"}``)."""
        return {name: self.column(col) for name, col in mapping.items()}
