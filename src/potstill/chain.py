"""Multi-stage recipes (``kind: chain``): a list of ordinary classic runs in which each stage's
distilled student is the next stage's teacher: teacher assistants planned between a large
teacher and a small student, or born-again generations of one architecture. Every stage keeps
its own run folder and report; the chain report puts all models side by side with the gain of
each step. A rerun with ``--resume`` skips finished stages."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .io import atomic_write_text
from .models import ArchSpec
from .recipe import Recipe, _Strict
from .stages import plan_arch

log = logging.getLogger("potstill")


class ChainStage(_Strict):
    """One stage: a name and the fields it changes in the chain's ``base`` recipe (e.g. its
    ``student`` architecture, ``objective`` or ``train`` budget)."""

    name: str
    set: dict[str, Any] = Field(default_factory=dict)


class ChainRecipe(_Strict):
    """A chain of classic runs (``kind: chain``). ``base`` is a classic recipe shared by every
    stage; the stages come from exactly one of ``stages`` (explicit), ``assistants`` (that many
    teacher assistants planned geometrically between ``base.teacher.arch`` and
    ``base.student.arch``, then the student) or ``generations`` (born-again: that many stages of
    ``base.student.arch``). Stage 1 learns from the base teacher; each later stage from the
    previous stage's distilled student in setting ``from_setting`` (default: the first).
    ``direct: true`` adds a stage that distills the last stage's student straight from the base
    teacher, for comparison; ``ensemble: true`` (with ``generations``) a last stage taught by
    the ensemble of all generations (the mean of their logits)."""

    kind: Literal["chain"]
    name: str = "chain"
    base: dict[str, Any]
    stages: list[ChainStage] | None = None
    assistants: int | None = Field(None, ge=1)
    generations: int | None = Field(None, ge=1)
    from_setting: str | None = None
    direct: bool = False
    ensemble: bool = False

    @model_validator(mode="after")
    def _check(self) -> ChainRecipe:
        given = [x is not None for x in (self.stages, self.assistants, self.generations)]
        if sum(given) != 1:
            raise ValueError("give exactly one of stages, assistants or generations")
        if self.ensemble and self.generations is None:
            raise ValueError("ensemble: true combines born-again generations; give generations")
        base = self.base_recipe()
        names = [s.name for s in self.planned()]
        if len(set(names)) != len(names) or {"direct", "ensemble"} & set(names):
            raise ValueError(
                f"stage names must be unique and not 'direct' or 'ensemble', got {names}"
            )
        settings = [s.name for s in base.settings]
        if self.from_setting is not None and self.from_setting not in settings:
            raise ValueError(f"from_setting: {self.from_setting!r} is not a setting ({settings})")
        for stage in self.planned():
            Recipe.model_validate(_merged(self.base, stage.set))  # each stage must validate
        return self

    def base_recipe(self) -> Recipe:
        """The shared classic recipe."""
        return Recipe.model_validate(self.base)

    def planned(self) -> list[ChainStage]:
        """The stages to run, in order (planned assistants or generations expanded)."""
        if self.stages is not None:
            return self.stages
        base = self.base_recipe()
        student = base.student.arch
        if self.generations is not None:
            return [ChainStage(name=f"generation-{i + 1}") for i in range(self.generations)]
        assert self.assistants is not None
        teacher = base.teacher.arch
        plan = plan_arch(teacher, student, self.assistants)
        stages = [
            ChainStage(name=f"assistant-{i + 1}", set={"student": {"arch": _arch_dict(a)}})
            for i, a in enumerate(plan)
        ]
        return stages + [ChainStage(name="student")]


def _arch_dict(arch: ArchSpec) -> dict[str, Any]:
    return arch.model_dump(include={"kind", "hidden", "channels", "dropout"})


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def run_chain(
    chain: ChainRecipe, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run every stage of ``chain`` in ``run_dir/<stage>`` (each an ordinary run) and write the
    chain's results.json and report.md; returns the results."""
    from .pipeline import _check_run_dir, _start_run_dir, run_recipe

    run_dir = Path(run_dir)
    _check_run_dir(run_dir, chain, resume, overwrite)
    _start_run_dir(run_dir, chain)
    t0 = time.perf_counter()
    base = chain.base_recipe()
    setting = chain.from_setting or base.settings[0].name
    stages = chain.planned()
    teacher_dir: Path | None = None
    first_teacher: Path | None = None
    done: dict[str, dict[str, Any]] = {}
    order: list[tuple[str, dict[str, Any], str]] = [(s.name, s.set, "chained") for s in stages]
    if chain.direct:
        order.append(("direct", stages[-1].set, "first"))
    if chain.ensemble:
        order.append(("ensemble", stages[-1].set, "ensemble"))
    generations: list[str] = []
    for name, changes, source in order:
        data = _merged(chain.base, changes)
        data["name"] = f"{chain.name}/{name}"
        teacher_path: str | list[str] | None = None
        if source == "chained" and teacher_dir is not None:
            teacher_path = str(teacher_dir)
        elif source == "first":
            teacher_path = str(first_teacher)
        elif source == "ensemble":
            teacher_path = generations
        if teacher_path is not None:
            data["teacher"] = {**data.get("teacher", {}), "path": teacher_path}
        recipe = Recipe.model_validate(data)
        folder = run_dir / name
        log.info("chain %s: stage %s", chain.name, name)
        results = run_recipe(recipe, folder, resume=resume or (folder / "results.json").exists())
        done[name] = results
        if first_teacher is None:
            first_teacher = folder / "teacher" / "final"
            if isinstance(recipe.teacher.path, str):
                first_teacher = Path(recipe.teacher.path)
        if source == "chained":
            teacher_dir = folder / setting / "distilled" / "final"
            generations.append(str(teacher_dir))
    out = {
        "kind": "chain",
        "name": chain.name,
        "setting": setting,
        "stages": [n for n, _, _ in order],
        "rows": _rows(done, setting),
        "wall_time_s": time.perf_counter() - t0,
    }
    atomic_write_text(run_dir / "results.json", json.dumps(out, indent=1, default=str))
    atomic_write_text(run_dir / "report.md", chain_markdown(out))
    return out


def _rows(done: dict[str, dict[str, Any]], setting: str) -> list[dict[str, Any]]:
    """Teacher, then per stage its distilled student (and the baseline without a teacher)."""
    first = next(iter(done.values()))
    keys = ("accuracy", "parameters", "file_bytes", "latency_ms", "throughput")
    rows = [{"model": "teacher", "stage": "—", **{k: first["teacher"].get(k) for k in keys}}]
    for name, results in done.items():
        runs = next(s["runs"] for s in results["settings"] if s["name"] == setting)
        for kind in ("distilled", "baseline"):
            if kind in runs:
                label = "distilled" if kind == "distilled" else "without teacher"
                rows.append({"model": f"{name} ({label})", "stage": name,
                             **{k: runs[kind].get(k) for k in keys}})  # fmt: skip
    return rows


def chain_markdown(results: dict[str, Any]) -> str:
    """The chain's report: every model side by side, and the change of each step."""
    lines = [
        f"# potstill chain report: {results['name']}",
        "",
        f"Stages in order: {', '.join(results['stages'])}; each stage's teacher is the previous "
        f"stage's distilled student (setting {results['setting']}); 'direct' (when present) "
        "learns from the first teacher, 'ensemble' from the mean of all generations. Test "
        "accuracy; latency at batch 1, throughput at the recipe's batch. Whole chain "
        f"{results['wall_time_s'] / 60:.1f} min.",
        "",
        "| model | parameters | test accuracy | change from its teacher | latency (ms) | "
        "throughput (ex/s) |",
        "|---|---|---|---|---|---|",
    ]
    teacher = previous = results["rows"][0]["accuracy"]
    for row in results["rows"]:
        change = "—"
        if row["model"].endswith("(distilled)"):
            # a chained stage learned from the stage before it; 'direct' from the first
            # teacher; 'ensemble' from all generations (compared with the last one)
            source = teacher if row["stage"] == "direct" else previous
            change = f"{100 * (row['accuracy'] - source):+.2f} points"
            if row["stage"] not in ("direct", "ensemble"):
                previous = row["accuracy"]
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {100 * row['accuracy']:.2f}% | {change} "
            f"| {row['latency_ms']:.3f} | {row['throughput']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["ChainRecipe", "ChainStage", "chain_markdown", "run_chain"]
