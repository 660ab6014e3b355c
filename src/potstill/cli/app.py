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


EXTRAS = {
    "transformers": "hf", "datasets": "hf", "accelerate": "hf", "gguf": "hf",
    "sentence_transformers": "hf", "rouge_score": "hf", "PIL": "hf",
    "tensorboard": "trackers", "wandb": "trackers", "mlflow": "trackers",
    "torchvision": "vision",
}  # fmt: skip
"""A package potstill needs only for some work → the extra that installs it."""


def install_hint(e: ModuleNotFoundError) -> str:
    """One line naming the missing package and the command that installs it."""
    name = (e.name or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra:
        return f"this needs {name}, which is not installed: pip install 'potstill[{extra}]'"
    return f"this needs {name or e}, which is not installed: pip install {name}"


def fail(e: Exception) -> None:
    """Print ``e`` as one line (a missing package as the command that installs it), exit 2."""
    text = install_hint(e) if isinstance(e, ModuleNotFoundError) else str(e)
    typer.echo(f"error: {text}", err=True)
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
    from ..served import ServerError

    return (ValueError, OSError, CheckpointError, ModuleNotFoundError, ServerError)


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
