"""What the CLI says about recipes: one line per built-in recipe (its kind and the first sentence
of its header comment), a commented template per kind (every field, with the values of the
built-in example of that kind and the fields' descriptions), and the JSON schema of every kind
for editors (YAML language servers read it)."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import RECIPE_KINDS, builtin_recipes, read_recipe_data, recipe_kind, validate_recipe
from .common import RecipeError

SCHEMA_ID = "https://potstill.invalid/recipe.schema.json"
"""The ``$id`` of the recipe schema (a name, not a place to fetch it from)."""


def header_comment(name: str) -> str:
    """The comment lines at the top of built-in recipe ``name``, without their ``#``."""
    text = (resources.files("potstill") / "recipes" / f"{name}.yaml").read_text()
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


def first_sentence(text: str, limit: int = 110) -> str:
    """The first sentence of ``text`` (up to its first ``. `` or ``; ``), cut to ``limit``."""
    flat = " ".join(text.split())
    m = re.search(r"[.;](\s|$)", flat)
    out = flat[: m.start()] if m else flat
    return out if len(out) <= limit else out[: limit - 1].rstrip() + "…"


def recipe_lines() -> list[tuple[str, str, str]]:
    """Each built-in recipe: its name, kind and one-line description."""
    out = []
    for name in builtin_recipes():
        data, _ = read_recipe_data(name)
        out.append((name, recipe_kind(data), first_sentence(header_comment(name))))
    return out


def example_for(kind: str) -> str:
    """The built-in recipe a template of ``kind`` starts from (the default for classic)."""
    if kind not in RECIPE_KINDS:
        raise RecipeError(f"unknown recipe kind {kind!r}; the kinds: {', '.join(RECIPE_KINDS)}")
    if kind == "classic":
        return "default"
    for name in builtin_recipes():
        if recipe_kind(read_recipe_data(name)[0]) == kind:
            return name
    raise RecipeError(f"no built-in recipe of kind {kind!r} to start a template from")


def _comment(text: str | None, pad: str) -> list[str]:
    if not text:
        return []
    return [f"{pad}# {line}".rstrip() for line in text.strip().splitlines()]


def _doc(value: Any) -> str | None:
    doc = type(value).__doc__ if isinstance(value, BaseModel) else None
    return first_sentence(doc, limit=96) if doc else None


def _item(key: str, value: Any, dumped: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(dumped, dict) and dumped and isinstance(value, BaseModel | dict):
        lines = [f"{pad}{key}:"]
        if isinstance(value, BaseModel):
            return lines + _fields(value, dumped, indent + 2)
        for k, d in dumped.items():
            v = value.get(k)
            lines += _comment(_doc(v), pad + "  ") + _item(str(k), v, d, indent + 2)
        return lines
    text = yaml.safe_dump({key: dumped}, sort_keys=False, allow_unicode=True, width=90)
    return [pad + line for line in text.rstrip("\n").splitlines()]


def _fields(model: BaseModel, dumped: dict[str, Any], indent: int) -> list[str]:
    lines: list[str] = []
    fields = type(model).model_fields
    for key, d in dumped.items():
        value = getattr(model, key, None)
        f = fields.get(key)
        lines += _comment((f.description if f else None) or _doc(value), " " * indent)
        lines += _item(key, value, d, indent)
    return lines


def template(kind: str) -> str:
    """A commented recipe of ``kind``: every field of the built-in example of that kind, with
    its resolved value (defaults included) and its description; it validates as it is."""
    name = example_for(kind)
    data, where = read_recipe_data(name)
    if kind != recipe_kind(data):
        data = {**data, "kind": kind}
    recipe = validate_recipe(data, where)
    dumped = recipe.model_dump(mode="json")
    head = [
        f"A {kind} recipe: every field, with the values of the built-in recipe {name!r}",
        "(defaults included). Edit it, check it with `potstill validate FILE`, run it with",
        "`potstill distill FILE`. The example's own notes:",
        "",
        *header_comment(name).splitlines(),
    ]
    lines = _comment("\n".join(head), "") + [""] + _fields(recipe, dumped, 0)
    return "\n".join(lines) + "\n"


def recipe_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) a recipe file matches: any one kind's schema (``kind``
    absent is a classic recipe)."""
    classes = list(dict.fromkeys(RECIPE_KINDS.values()))
    refs, schema = models_json_schema([(c, "validation") for c in classes])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "potstill recipe",
        "description": "A potstill recipe (YAML): see `potstill new KIND` for a template.",
        "anyOf": [refs[(c, "validation")] for c in classes],
        **schema,
    }


__all__ = ["example_for", "first_sentence", "recipe_lines", "recipe_schema", "template"]
