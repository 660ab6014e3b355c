"""The data section of the recipes that read the user's own data: where the rows are (files, a
folder, a hub dataset, or a built-in source), how the splits are made, which columns hold the
task's fields, and how long a tokenized text may be."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..data.tables import FORMATS
from .common import StrictModel

Files = str | list[str]


class TableSpec(StrictModel):
    """Where the rows are and how they are split (:func:`potstill.data.tables.load_table_splits`).

    Give one of ``path`` (a file, glob or folder: CSV/TSV, JSON/JSON Lines, Parquet, text, an
    image folder, a ``save_to_disk`` folder), files per split (``train``, ``validation``,
    ``test``), ``hub`` (a Hugging Face dataset name, with ``config`` and ``splits``), or
    ``builtin`` (a built-in source: ``fortunes``, ...). Missing validation / test splits are
    carved from the training rows (``val_size``, ``test_size``: a count or a fraction)."""

    path: Files | None = None
    train: Files | None = None
    validation: Files | None = None
    test: Files | None = None
    format: Literal[FORMATS] | None = Field(  # type: ignore[valid-type]
        None, description="default: from the file suffix or the folder's content"
    )
    hub: str | None = Field(None, description="a dataset on the Hugging Face hub")
    config: str | None = Field(None, description="hub only: the dataset's configuration")
    splits: dict[Literal["train", "validation", "test"], str] | None = Field(
        None, description="hub only: the dataset's split for each of train/validation/test"
    )
    builtin: str | None = Field(None, description="a built-in data source, e.g. fortunes")
    text_by: Literal["line", "paragraph", "document"] = Field(
        "line", description="text files: one example per line, paragraph or file"
    )
    val_size: float | None = Field(0.1, gt=0, description="count, or fraction of train")
    test_size: float | None = Field(0.1, gt=0, description="count, or fraction of train")
    columns: dict[str, str] = Field(
        default_factory=dict, description="the task's field → the data's column"
    )

    @model_validator(mode="after")
    def _one_source(self) -> TableSpec:
        given = [k for k in ("path", "hub", "builtin") if getattr(self, k)]
        per_split = [k for k in ("train", "validation", "test") if getattr(self, k)]
        if len(given) > 1 or (per_split and given and given != ["path"]):
            raise ValueError(f"give one of path, hub, builtin or per-split files, not {given}")
        if not given and not per_split:
            raise ValueError(
                "no data given: give path (a file or folder), train/validation/test files, "
                "hub (a dataset name) or builtin"
            )
        if per_split and "train" not in per_split and "path" not in given:
            raise ValueError("per-split files need a train file (or path)")
        return self

    @property
    def described(self) -> str:
        """Where the rows are, in a few words (for reports and model cards)."""
        if self.hub:
            return f"hub dataset {self.hub}" + (f" ({self.config})" if self.config else "")
        if self.builtin:
            return f"built-in {self.builtin}"
        files = self.path or self.train
        return str(files if isinstance(files, str) else ", ".join(files or []))

    def source_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~potstill.data.tables.load_table_splits`."""
        fields = ("path", "train", "validation", "test", "format", "hub", "config", "splits",
                  "builtin", "text_by")  # fmt: skip
        out: dict[str, Any] = {k: getattr(self, k) for k in fields}
        for k in ("val_size", "test_size"):
            v = getattr(self, k)
            out[k] = int(v) if v is not None and v >= 1 else v
        return out
