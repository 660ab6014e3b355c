"""The ``potstill`` command: ``distill`` a recipe, ``cache`` a teacher's signal, ``generate``
teacher answers, ``eval`` a saved model, rebuild a ``report``, ``convert`` a GGUF file; list
built-in ``recipes``, ``validate`` a recipe, start a ``new`` one, print the recipe ``schema``;
``--version``, and shell completion (``--install-completion``)."""

from __future__ import annotations

import sys

from . import commands, recipes  # the order of the commands in --help
from .app import app, data_dir_override, recipe_prefix


def main() -> None:
    """Console-script entry point."""
    app(sys.argv[1:], prog_name="potstill")


__all__ = ["app", "commands", "data_dir_override", "main", "recipe_prefix", "recipes"]
