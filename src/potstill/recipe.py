"""Recipes: one YAML file says what to distill into what, on which data, with which objective and
budget. Validated by pydantic; a bad recipe gives an error naming the field, the value and what
is accepted."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import TrainConfig
from .losses.objective import Objective, Term, ce_term, divergence_term, kd_term
from .models import ArchSpec

TERM_KINDS = ("kd", "ce", "fkl", "rkl", "jsd", "tvd", "mse")
DEFAULT_EPOCHS = 10
DEFAULT_TEACHER_EPOCHS = 5


class RecipeError(ValueError):
    """A recipe could not be read or is invalid; the message names the field."""


class _Strict(BaseModel):
    # coerce numbers: `--set name=2024` is parsed as YAML and gives an int for a text field
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class DataSpec(_Strict):
    """Which built-in task, where its files are, how much of the training set is held out."""

    name: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    data_dir: str | None = Field(None, description="folder with the IDX files (fashion-mnist)")
    val_size: int = Field(5000, gt=0)


class TeacherSpec(_Strict):
    """A saved teacher (``path``), or an architecture that potstill trains first and keeps."""

    path: str | None = None
    arch: ArchSpec = Field(default_factory=lambda: ArchSpec(hidden=[1024, 1024], dropout=0.2))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=DEFAULT_TEACHER_EPOCHS))
    cache: bool = Field(True, description="compute the teacher's logits once and reuse them")


class StudentSpec(_Strict):
    """The student's architecture."""

    arch: ArchSpec = Field(default_factory=lambda: ArchSpec(hidden=[32]))


class TermSpec(_Strict):
    """One objective term: ``kd`` (Hinton soft targets, T² scaled), ``ce`` (labels), or a
    divergence ``fkl``/``rkl``/``jsd``/``tvd``/``mse`` between student and teacher logits."""

    kind: Literal["kd", "ce", "fkl", "rkl", "jsd", "tvd", "mse"]
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, ge=0, le=1, description="jsd only")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="ce only")
    name: str | None = None

    def build(self) -> Term:
        """The loss term this entry describes."""
        name = self.name or self.kind
        if self.kind == "kd":
            return kd_term(self.temperature, self.weight, name)
        if self.kind == "ce":
            return ce_term(self.weight, label_smoothing=self.label_smoothing, name=name)
        return divergence_term(self.kind, self.temperature, self.beta, self.weight, name)


class SettingSpec(_Strict):
    """One experimental setting: the student sees labels for ``labelled_fraction`` of the
    training set; the teacher labels all of it."""

    name: str
    labelled_fraction: float = Field(1.0, gt=0, le=1)


class EvalSpec(_Strict):
    """Final evaluation: speed measurement batch sizes."""

    latency_batch: int = Field(1, gt=0)
    throughput_batch: int = Field(256, gt=0)
    measure_cache_speedup: bool = True


class Recipe(_Strict):
    """A whole distillation run."""

    name: str = "run"
    seed: int = 0
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)  # type: ignore[arg-type]
    student: StudentSpec = Field(default_factory=StudentSpec)
    objective: list[TermSpec] = Field(
        default_factory=lambda: [
            TermSpec(kind="kd", weight=0.5, temperature=4.0),
            TermSpec(kind="ce", weight=0.5),
        ]
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=DEFAULT_EPOCHS))
    settings: list[SettingSpec] = Field(default_factory=lambda: [SettingSpec(name="main")])
    baseline: bool = Field(True, description="also train the student without a teacher")
    evaluation: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="before")
    @classmethod
    def _keep_budget_defaults(cls, data: Any) -> Any:
        # a partial train section (`train: {batch_size: 64}`) keeps the default budget instead of
        # falling back to TrainConfig's one epoch
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("train"), dict):
            data["train"] = {"epochs": DEFAULT_EPOCHS, **data["train"]}
        teacher = data.get("teacher")
        if isinstance(teacher, dict) and isinstance(teacher.get("train"), dict):
            data["teacher"] = {
                **teacher,
                "train": {"epochs": DEFAULT_TEACHER_EPOCHS, **teacher["train"]},
            }
        return data

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        # one seed for the whole run unless a section sets its own
        for cfg in (self.train, self.teacher.train):
            if "seed" not in cfg.model_fields_set:
                cfg.seed = self.seed
        if not self.objective:
            raise ValueError("objective: needs at least one term, e.g. [{kind: kd}, {kind: ce}]")
        names = [t.name or t.kind for t in self.objective]
        if len(set(names)) != len(names):
            raise ValueError(
                f"objective: term names must be unique, got {names}; give repeated kinds a 'name'"
            )
        snames = [s.name for s in self.settings]
        if len(set(snames)) != len(snames):
            raise ValueError(f"settings: names must be unique, got {snames}")
        return self

    def build_objective(self) -> Objective:
        """The objective of the distilled student."""
        return Objective([t.build() for t in self.objective])


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with potstill."""
    folder = resources.files("potstill") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str | os.PathLike) -> tuple[dict[str, Any], str]:
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
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML: {e}") from e
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
        loc = ".".join(str(x) for x in e["loc"]) or "recipe"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and indentation)"
        value = e.get("input")
        shown = "" if e["type"] == "missing" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def load_recipe(source: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe from a YAML file or a built-in name, apply ``--set`` overrides, validate."""
    data, where = _read_yaml(source)
    data = apply_overrides(data, overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, where)) from None
