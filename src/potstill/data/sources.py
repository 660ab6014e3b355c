"""Data sources: rows from somewhere, by split and column (:class:`~potstill.data.rows.Rows`),
which a task maps by column name to its fields. Today the built-in corpora; a new source (files,
Hugging Face datasets) is one file with its loader and one entry in :data:`SOURCES`."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

from .rows import DataError, Rows

SOURCES: dict[str, str | Callable[..., dict[str, Rows]]] = {
    "fashion-mnist": "potstill.data.images:fashion_mnist_rows",
    "digits": "potstill.data.images:digits_rows",
    "fortunes": "potstill.data.fortunes:fortune_rows",
    "instructions": "potstill.data.instructions:instruction_rows",
    "prompts": "potstill.data.prompts:prompt_rows",
}
"""Source name → its loader: ``module:function`` (imported when first used) or the function
itself (a source registered from your own code). A loader takes the source's options and returns
its splits (``{"train": Rows, "test": Rows}``, or ``{"all": Rows}`` when it has no splits)."""


def load_callable(entry: str | Callable[..., Any], where: str = "entry") -> Callable[..., Any]:
    """The function an entry names (``module:function``, imported now), or the entry itself
    when it is already callable; ValueError naming ``where`` when it cannot be imported."""
    if callable(entry):
        return entry
    module, sep, function = str(entry).partition(":")
    try:
        found = getattr(import_module(module), function) if sep else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}: cannot import {entry!r}: {e}") from e
    if not callable(found):
        raise ValueError(f"{where}: {entry!r} is not a module:function that can be imported")
    return found


def loader(name: str) -> Callable[..., dict[str, Rows]]:
    """The loader of source ``name``; DataError listing the sources otherwise."""
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; data sources: {', '.join(SOURCES)}")
    return load_callable(SOURCES[name], f"data source {name!r}")


def load_rows(name: str, **options: Any) -> dict[str, Rows]:
    """The rows of every split of data source ``name`` (``options`` go to its loader)."""
    return loader(name)(**options)
