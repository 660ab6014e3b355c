"""Recipes: one YAML file says what to distill into what, on which data, with which objective and
budget. Every kind is one schema file here (:mod:`.classic`, :mod:`.embed`, :mod:`.causal_lm`,
:mod:`.chain`, over the shared :mod:`.common`), loaded through one pydantic union discriminated
on ``kind`` (classic when absent). A bad recipe gives an error naming the field, the value and
what is accepted."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, Discriminator, Tag, TypeAdapter, ValidationError

from .causal_lm import LMRecipe
from .chain import ChainRecipe
from .classic import ClassicRecipe
from .common import RecipeError, StrictModel
from .embed import EmbedRecipe
from .text_classification import TextClassificationRecipe

RECIPE_KINDS: dict[str, type[StrictModel]] = {
    "classic": ClassicRecipe,
    "image-classification": ClassicRecipe,  # the same road, by the name users look for
    "embed": EmbedRecipe,
    "causal-lm": LMRecipe,
    "chain": ChainRecipe,
    "text-classification": TextClassificationRecipe,
}
"""Recipe kind → its schema. A new kind is a schema file here and an entry in this table (and
its runner in :data:`potstill.runs.RUNNERS`, its report page in :data:`potstill.report.PAGES`)."""


def recipe_kind(data: Any) -> str:
    """The kind of recipe data (a mapping) or of a validated recipe: ``classic`` when absent."""
    if isinstance(data, dict):
        return str(data.get("kind") or "classic")
    return str(getattr(data, "kind", "classic"))


AnyRecipe = Annotated[
    Union[tuple(Annotated[cls, Tag(kind)] for kind, cls in RECIPE_KINDS.items())],  # type: ignore[valid-type]  # noqa: UP007
    Discriminator(recipe_kind),
]
"""Any recipe: the union of every kind's schema, discriminated on ``kind``."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyRecipe)


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with potstill."""
    folder = resources.files("potstill") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_recipe_data(source: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The raw data of a recipe file or built-in recipe, and how to name it in messages."""
    path = Path(source)
    if not path.exists() and str(source) in builtin_recipes():
        text = (resources.files("potstill") / "recipes" / f"{source}.yaml").read_text()
        where = f"built-in recipe {source!r}"
    elif path.exists():
        text, where = path.read_text(), str(path)
    else:
        raise RecipeError(
            f"recipe {source!r} is neither a file nor a built-in recipe "
            f"(built-in: {', '.join(builtin_recipes())})"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML: {e}") from e
    if data is None:  # an empty file: never a silent run of every default
        raise RecipeError(
            f"{where} is empty; a recipe needs at least a name and what to distil (see "
            "`potstill recipes` and docs/guide.md; `{}` runs the classic defaults)"
        )
    if not isinstance(data, dict):
        raise RecipeError(
            f"{where}: the top level must be a mapping of fields, got {type(data).__name__}"
        )
    return data, where


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML; list items by index)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node: Any = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(
                        f"--set {key}: {'.'.join(parts[:i]) or 'recipe'} is a list "
                        f"of {len(node)}; {part!r} is not an index in it"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise RecipeError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")
    return data


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem: the dotted field, the bad value, and what is accepted."""
    lines = [f"{where}: invalid recipe"]
    for e in err.errors():
        parts = list(e["loc"])
        if parts and parts[0] in RECIPE_KINDS:  # the union's tag: not a field of the recipe
            parts = parts[1:]
        loc = ".".join(str(x) for x in parts) or "recipe"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and indentation)"
        value = e.get("input")
        shown = "" if e["type"] == "missing" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def validate_recipe(data: dict[str, Any], where: str = "recipe") -> AnyRecipe:
    """Recipe data validated as the kind it names (classic when ``kind`` is absent);
    :class:`RecipeError` naming each bad field, or the kinds accepted for an unknown ``kind``."""
    kind = recipe_kind(data)
    if kind not in RECIPE_KINDS:
        raise RecipeError(
            f"{where}: kind: unknown recipe kind {kind!r}; accepted kinds: "
            f"{', '.join(RECIPE_KINDS)} (classic when kind is absent)"
        )
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, where)) from None


def set_report_to(recipe: Any, value: str | list[str]) -> Any:
    """``recipe`` with ``report_to`` set in each of its training settings (``train``, a
    teacher's ``train`` / ``finetune``, a hint's, a chain base's); returns it."""
    from ..config import TrainConfig

    try:
        TrainConfig(report_to=value)  # type: ignore[arg-type]
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, "--report-to")) from None

    def walk(node: Any) -> None:
        if isinstance(node, TrainConfig):
            node.report_to = value  # type: ignore[assignment]
        elif isinstance(node, BaseModel):
            for name in type(node).model_fields:
                walk(getattr(node, name))
        elif isinstance(node, dict):
            for key, sub in node.items():
                if key in ("train", "finetune") and isinstance(sub, dict):
                    sub["report_to"] = value
                else:
                    walk(sub)
        elif isinstance(node, list):
            for sub in node:
                walk(sub)

    walk(recipe)
    return validate_recipe(recipe.model_dump(mode="json"))


def load_recipe(source: str | os.PathLike, overrides: list[str] | None = None) -> AnyRecipe:
    """Read a recipe from a YAML file or a built-in name, apply ``--set`` overrides, validate."""
    data, where = read_recipe_data(source)
    data = apply_overrides(data, overrides or [])
    return validate_recipe(data, where)
