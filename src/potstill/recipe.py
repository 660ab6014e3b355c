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
from .losses.feature_terms import (
    FEATURE_TERM_KINDS,
    attention_term,
    attention_transfer_term,
    feature_term,
    minilm_term,
    relational_term,
)
from .losses.features import explicit_layer_map, last_k_layer_map, uniform_layer_map
from .losses.objective import Objective, Term
from .losses.terms import ce_term, divergence_term, kd_term
from .models import ArchSpec
from .taps import TapSpec

TERM_KINDS = ("kd", "ce", "fkl", "rkl", "jsd", "tvd", "mse", "skl", "srkl")
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
    """A saved teacher (``path``; a list of paths: their ensemble, the mean of their logits), or
    an architecture that potstill trains first and keeps."""

    path: str | list[str] | None = None
    arch: ArchSpec = Field(default_factory=lambda: ArchSpec(hidden=[1024, 1024], dropout=0.2))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=DEFAULT_TEACHER_EPOCHS))
    cache: bool = Field(True, description="compute the teacher's logits once and reuse them")


class StudentSpec(_Strict):
    """The student's architecture."""

    arch: ArchSpec = Field(default_factory=lambda: ArchSpec(hidden=[32]))


class TermSpec(_Strict):
    """One objective term.

    On logits: ``kd`` (Hinton soft targets, T² scaled), ``ce`` (labels), or a divergence
    ``fkl``/``rkl``/``jsd``/``tvd``/``mse``. On tapped features (``student``/``teacher`` name
    taps; ``logits`` names the output): ``feature`` (``loss`` mse/cosine/smooth_l1, projector
    when shapes differ, ``layer_map`` uniform/last-k/explicit pairs for wildcard taps),
    ``attention_mse``/``attention_kl`` (TinyBERT), ``minilm`` (three taps each: q, k, v;
    ``relation_heads``), ``at`` (attention transfer, ``p``), ``rkd_distance``, ``rkd_angle``,
    ``pkt``.
    """

    kind: Literal[
        "kd", "ce", "fkl", "rkl", "jsd", "tvd", "mse", "skl", "srkl",
        "feature", "attention_mse", "attention_kl", "minilm", "at",
        "rkd_distance", "rkd_angle", "pkt",
    ]  # fmt: skip
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, ge=0, le=1, description="jsd only")
    skew: float = Field(0.1, ge=0, le=1, description="skl and srkl only")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="ce only")
    name: str | None = None
    student: str | list[str] | None = Field(None, description="student tap name(s)")
    teacher: str | list[str] | None = Field(None, description="teacher tap name(s)")
    loss: Literal["mse", "cosine", "smooth_l1"] = Field("mse", description="feature only")
    normalize: bool = Field(False, description="feature only: L2-normalise first")
    layer_map: Literal["uniform", "last-k"] | list[tuple[int, int]] | None = None
    k: int | None = Field(None, gt=0, description="layer_map last-k only")
    p: float = Field(2.0, gt=0, description="at only")
    relation_heads: int | None = Field(None, gt=0, description="minilm only")

    @model_validator(mode="after")
    def _check(self) -> TermSpec:
        if self.kind in FEATURE_TERM_KINDS:
            needs_taps = self.kind not in ("rkd_distance", "rkd_angle", "pkt")
            if needs_taps and (self.student is None or self.teacher is None):
                raise ValueError(f"a {self.kind} term needs student and teacher tap names")
            if self.kind == "minilm" and self.relation_heads is None:
                raise ValueError("a minilm term needs relation_heads")
            if self.layer_map == "last-k" and self.k is None:
                raise ValueError("layer_map last-k needs k")
            if not needs_taps and (
                isinstance(self.student, list) or isinstance(self.teacher, list)
            ):
                raise ValueError(f"a {self.kind} term reads one tap per side, not a list")
        return self

    def build(self, layer_counts: dict[str, dict[str, int]] | None = None) -> Term:
        """The loss term this entry describes. ``layer_counts`` gives, per side, how many
        outputs each wildcard tap has (needed for ``uniform`` and ``last-k`` layer maps)."""
        name = self.name or self.kind
        if self.kind == "kd":
            return kd_term(self.temperature, self.weight, name)
        if self.kind == "ce":
            return ce_term(self.weight, label_smoothing=self.label_smoothing, name=name)
        if self.kind not in FEATURE_TERM_KINDS:
            return divergence_term(
                self.kind, self.temperature, self.beta, self.weight, name, skew=self.skew
            )
        s = self.student if self.student is not None else "logits"
        t = self.teacher if self.teacher is not None else "logits"
        if self.kind == "feature":
            return feature_term(
                s,
                t,
                loss=self.loss,
                normalize=self.normalize,
                weight=self.weight,
                layer_map=self._layer_map(layer_counts),
                name=name,
            )
        if self.kind in ("attention_mse", "attention_kl"):
            return attention_term(
                s,
                t,
                kind=self.kind,
                weight=self.weight,
                layer_map=self._layer_map(layer_counts),
                name=name,
            )
        if self.kind == "minilm":
            assert self.relation_heads is not None
            return minilm_term(
                _as_list(s),
                _as_list(t),
                relation_heads=self.relation_heads,
                weight=self.weight,
                name=name,
            )
        if self.kind == "at":
            return attention_transfer_term(s, t, p=self.p, weight=self.weight, name=name)
        assert isinstance(s, str) and isinstance(t, str), f"{self.kind}: one tap per side"
        return relational_term(self.kind, s, t, weight=self.weight, name=name)

    def _layer_map(self, counts: dict[str, dict[str, int]] | None) -> list[tuple[int, int]] | None:
        if self.layer_map is None:
            return None
        s, t = self.student, self.teacher
        if not (isinstance(s, str) and isinstance(t, str)):
            raise RecipeError(f"{self.kind}: layer_map needs one wildcard tap name per side")
        counts = counts or {}
        n_s, n_t = counts.get("student", {}).get(s), counts.get("teacher", {}).get(t)
        if isinstance(self.layer_map, list):
            return explicit_layer_map(self.layer_map, n_s or 10**9, n_t or 10**9)
        if n_s is None or n_t is None:
            raise RecipeError(
                f"{self.kind}: layer_map {self.layer_map} needs wildcard taps {s!r} (student) and "
                f"{t!r} (teacher), e.g. taps: {{student: {{{s}: 'encoder.layer.*'}}}}"
            )
        if self.layer_map == "uniform":
            return uniform_layer_map(n_s, n_t)
        assert self.k is not None
        return last_k_layer_map(n_s, n_t, self.k)


def _as_list(x: str | list[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


class TapSpecModel(_Strict):
    """A tap with an output selection."""

    path: str
    select: int | str | None = None


class TapsSpec(_Strict):
    """Modules whose outputs terms read: name → dotted path (``*`` wildcards) or
    ``{path, select}`` (tuple index or output attribute)."""

    student: dict[str, str | TapSpecModel] = Field(default_factory=dict)
    teacher: dict[str, str | TapSpecModel] = Field(default_factory=dict)

    def as_taps(self, side: str) -> dict[str, TapSpec]:
        """The taps of one side as TapSpecs."""
        raw = self.student if side == "student" else self.teacher
        return {
            k: TapSpec(v) if isinstance(v, str) else TapSpec(v.path, v.select)
            for k, v in raw.items()
        }


class HintSpec(_Strict):
    """An optional first stage (FitNets hints): the distilled student is trained on these
    feature terms alone before the main objective."""

    objective: list[TermSpec]
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1))


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
    taps: TapsSpec = Field(default_factory=TapsSpec)
    hint: HintSpec | None = None
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
        for cfg in (self.train, self.teacher.train) + ((self.hint.train,) if self.hint else ()):
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

    def build_objective(self, layer_counts: dict[str, dict[str, int]] | None = None) -> Objective:
        """The objective of the distilled student (``layer_counts``: see ``TermSpec.build``)."""
        return Objective([t.build(layer_counts) for t in self.objective])

    def build_hint_objective(
        self, layer_counts: dict[str, dict[str, int]] | None = None
    ) -> Objective | None:
        """The hint stage's objective, or None when the recipe has no hint stage."""
        if self.hint is None:
            return None
        return Objective([t.build(layer_counts) for t in self.hint.objective])


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
        if data.get("kind") == "embed":
            from .embed_pipeline import EmbedRecipe

            return EmbedRecipe.model_validate(data)  # type: ignore[return-value]
        if data.get("kind") == "causal-lm":
            from .llm.pipeline import LMRecipe

            return LMRecipe.model_validate(data)  # type: ignore[return-value]
        if data.get("kind") == "chain":
            from .chain import ChainRecipe

            return ChainRecipe.model_validate(data)  # type: ignore[return-value]
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, where)) from None
