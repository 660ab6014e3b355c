"""The chain runner: every stage of a ``kind: chain`` recipe is an ordinary run (classic or
causal-LM) in ``<run>/<stage>``, taught by the previous stage's distilled student (or by the
first teacher, or the ensemble of generations); one stage loop serves both kinds through a small
per-kind hook. The chain's results put every model side by side; a rerun with ``--resume``
skips finished stages."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from .. import distributed
from ..hf import load_model
from ..llm.evaluate import lm_figures
from ..recipe.causal_lm import LMRecipe
from ..recipe.chain import ChainRecipe, ChainStage, merged
from ..recipe.classic import ClassicRecipe
from ..recipe.common import folder_name
from ..report import write_report
from ..tasks.causal_lm import size_row
from . import causal_lm, classic
from .folder import RunFolder, place_teacher, run_devices
from .lm_data import initial_student, lm_datasets, load_lm_teacher

log = logging.getLogger("potstill")


@dataclass
class ChainState:
    """What later stages need to know of earlier ones."""

    first: Path | None = None  # the first stage's folder
    first_teacher: str | None = None  # classic: the first teacher's model folder
    first_cache: str | None = None  # causal-LM: the first teacher's cache
    previous: str | None = None  # the last chained stage's exported student
    previous_name: str | None = None
    generations: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StageKind:
    """How a chain runs stages of one recipe kind: ``schema`` validates a stage's data,
    ``teach(data, source, state, folder, chain)`` points its teacher at the right model,
    ``remember(state, recipe, folder)`` notes what the first stage leaves for later ones,
    ``student(setting)`` is where a stage's distilled student is (relative to its folder),
    ``rows(chain, run_dir, done, order, setting)`` the chain's table."""

    schema: type[BaseModel]
    run: Callable[..., dict[str, Any]]
    teach: Callable[[dict[str, Any], str, ChainState, Path, ChainRecipe], None]
    remember: Callable[[ChainState, Any, Path], None]
    student: Callable[[str], str]
    rows: Callable[..., list[dict[str, Any]]]


def lm_layer_count(model: str, *, trust_remote_code: bool = False) -> int:
    """The number of hidden layers of a causal LM (hub name, packaged asset or folder), read
    from its config without loading the weights."""
    from transformers import AutoConfig

    from ..assets import resolve

    config = AutoConfig.from_pretrained(resolve(model), trust_remote_code=trust_remote_code)
    return int(config.num_hidden_layers)


def link_copy(source: Path, target: Path) -> None:
    """Give ``target`` the files of ``source`` (hard links where possible), when ``source``
    exists and ``target`` does not: a stage with the same teacher and data reuses a cache or
    answers instead of computing them again (its run still checks them)."""
    if not source.exists() or target.exists() or not distributed.is_main():
        distributed.barrier()
        return

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp-link")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=link)
    os.replace(tmp, target)
    distributed.barrier()


# ---- classic stages ------------------------------------------------------------------------


def _classic_teach(
    data: dict[str, Any], source: str, state: ChainState, folder: Path, chain: ChainRecipe
) -> None:
    path: str | list[str] | None = None
    if source == "chained" and state.previous is not None:
        path = state.previous
    elif source == "first":
        path = state.first_teacher
        if state.first is not None:  # same teacher, same data: its logit cache fits
            cache = Path("teacher") / "cache-train"
            link_copy(state.first / cache, folder / cache)
    elif source == "ensemble":
        path = list(state.generations)
    if path is not None:
        data["teacher"] = {**data.get("teacher", {}), "path": path}


def _classic_remember(state: ChainState, recipe: ClassicRecipe, folder: Path) -> None:
    first = recipe.teacher.path
    state.first_teacher = first if isinstance(first, str) else str(folder / "teacher" / "final")


def _classic_rows(
    chain: ChainRecipe, run_dir: Path, done: dict[str, dict[str, Any]], order: list[str],
    setting: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """Teacher, then per stage its distilled student (and the baseline without a teacher)."""
    first = done[order[0]]["results"]
    keys = ("accuracy", "parameters", "file_bytes", "latency_ms", "throughput")
    rows = [{"model": "teacher", "stage": "—", **{k: first["teacher"].get(k) for k in keys}}]
    for name in order:
        results = done[name]["results"]
        runs = next(s["runs"] for s in results["settings"] if s["name"] == setting)
        for kind in ("distilled", "baseline"):
            if kind in runs:
                label = "distilled" if kind == "distilled" else "without teacher"
                rows.append({"model": f"{name} ({label})", "stage": name,
                             **{k: runs[kind].get(k) for k in keys}})  # fmt: skip
    return rows


# ---- causal-LM stages ----------------------------------------------------------------------


def _lm_teach(
    data: dict[str, Any], source: str, state: ChainState, folder: Path, chain: ChainRecipe
) -> None:
    base = chain.base_recipe()
    student = data.setdefault("student", {})
    if student.get("model") is None:  # derived from the first teacher, as a direct one
        student["model"] = base.teacher.model
        student.setdefault("trust_remote_code", base.teacher.trust_remote_code)
    teacher = data["teacher"]
    cache = teacher.get("cache")
    if source == "chained" and state.previous is not None:
        teacher["model"] = state.previous
        if isinstance(cache, dict):  # a shared cache path belongs to the first teacher
            cache.pop("path", None)
    elif source == "first" and state.first is not None:
        link_copy(state.first / "answers", folder / "answers")
        if cache not in (None, False) and state.first_cache is not None:
            teacher["cache"] = {**(cache if isinstance(cache, dict) else {}),
                                "path": state.first_cache}  # fmt: skip


def _lm_remember(state: ChainState, recipe: LMRecipe, folder: Path) -> None:
    if recipe.teacher.cache is not None:
        state.first_cache = recipe.teacher.cache.path or str(folder / "teacher-cache")


def _lm_rows(
    chain: ChainRecipe, run_dir: Path, done: dict[str, dict[str, Any]], order: list[str],
    setting: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every model of an LLM chain measured in one pass against the first teacher on the base
    recipe's held-out data: the teacher, the last student before distillation, and each
    stage's distilled student (variant ``setting``)."""
    base = chain.base_recipe()
    placement, teacher_device = run_devices(chain)
    teacher, tok = load_lm_teacher(base)
    place_teacher(teacher, teacher_device)
    _, val, _ = lm_datasets(base, tok, teacher=teacher, run_dir=run_dir / order[0])
    chained = [n for n in order if n not in ("direct", "ensemble")]
    last = done[chained[-1]]
    untrained_recipe = last["recipe"].model_copy(update={"teacher": base.teacher})
    init, _, _ = initial_student(untrained_recipe, teacher, tok)
    placement.model(init)
    untrained = f"{chained[-1]} (not distilled)"
    models: dict[str, torch.nn.Module] = {"teacher": teacher, untrained: init}
    for name in order:
        folder = run_dir / name / folder_name(setting) / "export"
        models[name] = placement.model(load_model(folder, "causal-lm", dtype=teacher.dtype))
    log.info("chain %s: measuring every model against the first teacher", chain.name)
    figures = lm_figures(models, val, teacher=teacher, batch_size=base.eval_batch_size)
    first_rows = done[order[0]]["results"]["rows"]
    last_rows = last["results"]["rows"]
    untrained_row = next(r for k, r in last_rows.items() if k.endswith("not distilled"))
    keys = ("perplexity", "top1_agreement", "kl_to_teacher")
    rows = []
    for name, model in models.items():
        if name == "teacher":
            speed, stage, by, extra = first_rows["teacher"], "—", "—", {}
        elif name == untrained:
            speed, stage, by, extra = untrained_row, chained[-1], "—", {}
        else:
            row = done[name]["results"]["rows"][setting]
            speed, stage, by = row, name, done[name]["taught_by"]
            extra = {"steps": row.get("steps"), "train_time_s": row.get("train_time_s")}
        rows.append({
            "model": name, "stage": stage, "taught_by": by, **size_row(model),
            **{k: figures[name].get(k) for k in keys},
            "forward_tokens_per_s": speed.get("forward_tokens_per_s"), **extra,
        })  # fmt: skip
    return rows


STAGE_KINDS: dict[str, StageKind] = {
    "classic": StageKind(
        ClassicRecipe, classic.run, _classic_teach, _classic_remember,
        lambda setting: f"{setting}/distilled/final", _classic_rows,
    ),
    "causal-lm": StageKind(
        LMRecipe, causal_lm.run, _lm_teach, _lm_remember,
        lambda setting: f"{folder_name(setting)}/export", _lm_rows,
    ),
}  # fmt: skip
"""Base recipe kind → how the chain runs its stages."""


# ---- the one stage loop --------------------------------------------------------------------


def _order(chain: ChainRecipe, stages: list[ChainStage]) -> list[tuple[str, dict[str, Any], str]]:
    """``(name, changes, source)`` of every stage to run; ``source`` is where its teacher comes
    from: ``chained`` (the stage before), ``first`` (the base teacher) or ``ensemble``."""
    order = [(s.name, s.set, "chained") for s in stages]
    if chain.direct is not False:
        extra = chain.direct if isinstance(chain.direct, dict) else {}
        order.append(("direct", merged(stages[-1].set, extra), "first"))
    if chain.ensemble:
        order.append(("ensemble", stages[-1].set, "ensemble"))
    return order


def _planned(chain: ChainRecipe) -> list[ChainStage]:
    layers = None
    if chain.causal_lm and chain.assistants is not None:
        base = chain.base_recipe()
        layers = lm_layer_count(
            base.teacher.model, trust_remote_code=base.teacher.trust_remote_code
        )
    return chain.planned(layers)


def run(
    chain: ChainRecipe, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run every stage of ``chain`` in ``run_dir/<stage>`` (each an ordinary run) and write the
    chain's results.json and report; returns the results."""
    with RunFolder(run_dir, chain, resume=resume, overwrite=overwrite) as folder:
        folder.start()
        kind = STAGE_KINDS["causal-lm" if chain.causal_lm else "classic"]
        setting = chain.from_setting or chain.stage_outputs()[0]
        order = _order(chain, _planned(chain))
        state, done = ChainState(), {}
        for name, changes, source in order:
            data = merged(chain.base, changes)
            data["name"] = f"{chain.name}/{name}"
            stage_dir = folder.path / name
            kind.teach(data, source, state, stage_dir, chain)
            recipe = kind.schema.model_validate(data)
            log.info("chain %s: stage %s", chain.name, name)
            again = resume or (stage_dir / "results.json").exists()
            results = kind.run(recipe, stage_dir, resume=again)
            taught_by = state.previous_name if source == "chained" else None
            done[name] = {"results": results, "recipe": recipe, "taught_by": taught_by or "teacher"}
            if state.first is None:
                state.first = stage_dir
                kind.remember(state, recipe, stage_dir)
            if source == "chained":
                state.previous = str(stage_dir / kind.student(setting))
                state.previous_name = name
                state.generations.append(state.previous)
        main = distributed.is_main()  # every process trains each stage; rank 0 reports
        stages = [n for n, _, _ in order]
        rows = kind.rows(chain, folder.path, done, stages, setting) if main else []
        results = folder.write_results(
            {
                "base_kind": "causal-lm" if chain.causal_lm else "classic",
                "setting": setting,
                "stages": stages,
                "rows": rows,
            }
        )
        if main:
            write_report(folder.path, results)
        distributed.barrier()
        return results
