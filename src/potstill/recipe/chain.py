"""The chain recipe (``kind: chain``): a list of ordinary runs (classic or causal-LM) sharing a
``base`` recipe, in which each stage's distilled student teaches the next: teacher assistants
planned between a large teacher and a small student, or born-again generations."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from ..models import ArchSpec
from ..stages import plan_arch, plan_layers
from .causal_lm import LMRecipe
from .classic import ClassicRecipe
from .common import StrictModel

STAGE_KINDS = ("classic", "causal-lm")
"""The recipe kinds a chain's stages can be."""


class ChainStage(StrictModel):
    """One stage: a name and the fields it changes in the chain's ``base`` recipe (e.g. its
    ``student`` architecture or layers kept, ``objective``/``variants`` or ``train`` budget)."""

    name: str
    set: dict[str, Any] = Field(default_factory=dict)


class ChainRecipe(StrictModel):
    """A chain of runs (``kind: chain``). ``base`` is a classic recipe, or a causal-LM recipe
    (``kind: causal-lm``), shared by every stage; the stages come from exactly one of ``stages``
    (explicit), ``assistants`` (that many teacher assistants planned geometrically between the
    teacher and the student — built-in architectures by depth and width, derived LLM students by
    layers kept — then the student) or ``generations`` (born-again: that many stages of the
    base student). Stage 1 learns from the base teacher; each later stage from the previous
    stage's distilled student in setting (classic) or variant (causal-LM) ``from_setting``
    (default: the first). ``direct: true`` (or a mapping of changes, e.g. a larger
    ``train`` budget) adds a stage that distills the last stage's student straight from the
    base teacher, for comparison; ``ensemble: true`` (classic, with ``generations``) a last stage
    taught by the ensemble of all generations (the mean of their logits).

    Causal-LM stages: every student is derived from the base teacher (``student.keep`` layers of
    it, the same initial weights as a direct student would get) unless ``student.model`` names
    another model; its teacher is the previous stage's exported student."""

    kind: Literal["chain"]
    name: str = "chain"
    base: dict[str, Any] = Field(
        description="the recipe every stage shares: a classic or causal-lm recipe (its own fields)"
    )
    stages: list[ChainStage] | None = Field(
        None, description="explicit stages: each a name and the base fields it changes (set)"
    )
    assistants: int | None = Field(
        None, ge=1, description="that many teacher assistants planned between teacher and student"
    )
    generations: int | None = Field(
        None, ge=1, description="born-again: that many generations of the base student"
    )
    from_setting: str | None = Field(
        None, description="the setting or variant whose student teaches the next stage (first)"
    )
    direct: bool | dict[str, Any] = Field(
        False, description="also distil the last student straight from the base teacher (true, "
        "or the fields that stage changes), for comparison",
    )  # fmt: skip
    ensemble: bool = Field(
        False, description="classic generations: a last stage taught by their ensemble"
    )

    @model_validator(mode="after")
    def _check(self) -> ChainRecipe:
        kind = self.base.get("kind", "classic")
        if kind not in STAGE_KINDS:
            raise ValueError(
                f"base.kind: a chain's stages are runs of kind {' or '.join(STAGE_KINDS)}, "
                f"got {kind!r}"
            )
        given = [x is not None for x in (self.stages, self.assistants, self.generations)]
        if sum(given) != 1:
            raise ValueError("give exactly one of stages, assistants or generations")
        if self.ensemble and self.generations is None:
            raise ValueError("ensemble: true combines born-again generations; give generations")
        base = self.base_recipe()
        if self.causal_lm:
            if base.teacher.server is not None:
                raise ValueError(
                    "base.teacher.server: a chain's stages train from their own teachers (the "
                    "assistants), so a served teacher is not used there yet; drop it, or run "
                    "the causal-lm recipe on its own"
                )
            if self.ensemble:
                raise ValueError(
                    "ensemble: the ensemble of generations is built for classic chains; a "
                    "causal-LM chain cannot use it yet"
                )
            if self.assistants is not None and (
                base.student.keep is None
                and base.student.layers is None
                or base.student.model not in (None, base.teacher.model)
            ):
                raise ValueError(
                    "assistants: planning needs a student derived from the teacher "
                    "(base.student.keep); give stages explicitly for another student model"
                )
        names = [s.name for s in self._stage_names()]
        if len(set(names)) != len(names) or {"direct", "ensemble"} & set(names):
            raise ValueError(
                f"stage names must be unique and not 'direct' or 'ensemble', got {names}"
            )
        outputs = self.stage_outputs()
        if self.from_setting is not None and self.from_setting not in outputs:
            what = "variant" if self.causal_lm else "setting"
            raise ValueError(f"from_setting: {self.from_setting!r} is not a {what} ({outputs})")
        if not (self.causal_lm and self.assistants is not None):  # planned when run
            for stage in self.planned():
                self.stage_recipe(stage.set)  # each stage must validate
        if isinstance(self.direct, dict):
            self.stage_recipe(self.direct)
        return self

    @property
    def causal_lm(self) -> bool:
        """Whether the stages are causal-LM runs."""
        return self.base.get("kind") == "causal-lm"

    def base_recipe(self) -> Any:
        """The shared recipe (a ``ClassicRecipe`` or an ``LMRecipe``)."""
        return self.stage_recipe({})

    def stage_recipe(self, changes: dict[str, Any]) -> Any:
        """The base recipe with ``changes`` merged in, validated."""
        data = merged(self.base, changes)
        return (LMRecipe if self.causal_lm else ClassicRecipe).model_validate(data)

    def stage_outputs(self) -> list[str]:
        """The names a stage's student can be taken from: settings (classic) or variants."""
        base = self.base_recipe()
        return list(base.variants) if self.causal_lm else [s.name for s in base.settings]

    def _stage_names(self) -> list[ChainStage]:
        if self.causal_lm and self.assistants is not None:
            names = [f"assistant-{i + 1}" for i in range(self.assistants)] + ["student"]
            return [ChainStage(name=n) for n in names]
        return self.planned()

    def planned(self, teacher_layers: int | None = None) -> list[ChainStage]:
        """The stages to run, in order (planned assistants or generations expanded). A
        causal-LM chain with ``assistants`` needs the teacher's ``teacher_layers``."""
        if self.stages is not None:
            return self.stages
        base = self.base_recipe()
        if self.generations is not None:
            return [ChainStage(name=f"generation-{i + 1}") for i in range(self.generations)]
        assert self.assistants is not None
        if self.causal_lm:
            if teacher_layers is None:
                raise ValueError("planning LLM assistants needs the teacher's layer count")
            spec = base.student
            keep = spec.keep if spec.keep is not None else len(spec.layers)
            plan = plan_layers(teacher_layers, keep, self.assistants)
            stages = [
                ChainStage(name=f"assistant-{i + 1}", set={"student": {"keep": n, "layers": None}})
                for i, n in enumerate(plan)
            ]
            return stages + [ChainStage(name="student")]
        plan = plan_arch(base.teacher.arch, base.student.arch, self.assistants)
        stages = [
            ChainStage(name=f"assistant-{i + 1}", set={"student": {"arch": _arch_dict(a)}})
            for i, a in enumerate(plan)
        ]
        return stages + [ChainStage(name="student")]


def _arch_dict(arch: ArchSpec) -> dict[str, Any]:
    return arch.model_dump(include={"kind", "hidden", "channels", "dropout"})


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of recipe data ``base`` with ``changes`` merged in (mappings merged key by
    key, anything else replaced)."""
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out
