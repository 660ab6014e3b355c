"""The ``potstill`` command's application and what its commands share: logging and threads, input
errors as one message with exit 2, and where a recipe's fields are."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True,
    help="potstill: distill a large teacher into a small, fast student.",
)


def _version(show: bool) -> None:
    if show:
        from .._version import __version__

        typer.echo(f"potstill {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """potstill: distill a large teacher into a small, fast student."""


def setup(threads: int | None) -> bool:
    """Logging, threads, and the process group under torchrun; whether this process speaks
    (rank 0, or the only process)."""
    from .. import distributed

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)
    return distributed.is_main()


def fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@contextmanager
def reported(interrupted: str) -> Iterator[None]:
    """Input errors become one message and exit 2; Ctrl-C says ``interrupted`` and exits 130."""
    try:
        yield
    except user_errors() as e:
        fail(e)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {interrupted}", err=True)
        raise typer.Exit(130) from None


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by input (recipe, files, data, checkpoints): shown as one message, not a
    traceback."""
    from ..checkpoints import CheckpointError

    return (ValueError, OSError, CheckpointError)


def data_dir_override(recipe: str, data_dir: str) -> str:
    """The ``--set`` that points ``recipe`` at the dataset folder ``data_dir``: ``data.data_dir``
    in classic recipes, ``data.folder`` in text ones, under ``base.`` in a chain."""
    from ..recipe import read_recipe_data, recipe_kind

    data = read_recipe_data(recipe)[0]
    prefix = ""
    if recipe_kind(data) == "chain":  # a chain's stages share its base recipe's data
        data, prefix = data.get("base") or {}, "base."
    field = "data_dir" if recipe_kind(data) == "classic" else "folder"
    return f"{prefix}data.{field}={data_dir}"


def recipe_prefix(recipe: str) -> str:
    """Where a recipe's run fields are: ``base.`` in a chain (its stages share them), else the
    top level."""
    from ..recipe import read_recipe_data, recipe_kind

    return "base." if recipe_kind(read_recipe_data(recipe)[0]) == "chain" else ""
