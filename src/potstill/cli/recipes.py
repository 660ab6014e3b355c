"""The commands that explain recipes: list the built-in ``recipes``, ``validate`` one without
running it, start a ``new`` one from a commented template, print the recipe ``schema``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml

from .app import app, reported


@app.command()
def recipes() -> None:
    """List the built-in recipes: name, kind and what each does."""
    from ..recipe.explain import first_sentence, recipe_lines

    rows = recipe_lines()
    width = max(len(name) for name, _, _ in rows)
    kinds = max(len(kind) for _, kind, _ in rows)
    for name, kind, what in rows:
        typer.echo(f"{name:<{width}}  {kind:<{kinds}}  {first_sentence(what, limit=80)}")


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file, or a built-in name")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: key.sub=value (repeatable)")
    ] = None,
) -> None:
    """Check a recipe without running it.

    Prints it resolved (every default filled in), or each bad field and what is accepted (exit
    2)."""
    from ..recipe import load_recipe

    with reported(interrupted="nothing was run"):
        r = load_recipe(recipe, list(set_ or []))
    typer.echo(f"# {recipe}: a valid {r.kind} recipe, resolved")
    typer.echo(yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False, allow_unicode=True))


@app.command()
def new(
    kind: Annotated[
        str,
        typer.Argument(
            help="classic, image-classification, text-classification, embed, causal-lm or chain"
        ),  # fmt: skip
    ],
    out: Annotated[
        Path | None, typer.Option(help="write the template here (not over an existing file)")
    ] = None,
) -> None:
    """Print a commented recipe of KIND: every field, its value and what it means."""
    from ..io import atomic_write_text
    from ..recipe.explain import template

    with reported(interrupted="nothing was written"):
        text = template(kind)
        if out is None:
            typer.echo(text, nl=False)
            return
        if out.exists():
            raise ValueError(f"--out {out} exists; give another file or remove it first")
        atomic_write_text(out, text)
    typer.echo(f"wrote {out}; check it with `potstill validate {out}`")


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option(help="write the schema here")] = None,
) -> None:
    """Print the JSON schema of recipes, for editors.

    Save it and point a recipe at it with a first line `# yaml-language-server: $schema=FILE`
    (the YAML language server of VS Code and other editors then checks and completes it)."""
    from ..io import atomic_write_text
    from ..recipe.explain import recipe_schema

    text = json.dumps(recipe_schema(), indent=1)
    if out is None:
        typer.echo(text)
        return
    atomic_write_text(out, text + "\n")
    typer.echo(f"wrote {out}")
