"""A recipe run end to end: train or load the teacher, cache its logits, train for each setting the
student without a teacher (the baseline) and with distillation at the same budget, evaluate all
of them on the test set, and write ``results.json`` and the report."""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from . import distributed
from ._version import __version__
from .cache import CachedTeacher, cached_or_live
from .config import TrainConfig
from .data.images import load_splits
from .data.splits import Splits, hide_labels, labelled_only
from .distiller import Distiller, FitResult
from .evaluate import classification_eval, model_card_figures, predict_logits
from .io import atomic_write_text
from .losses.objective import Objective
from .losses.terms import labels_only_objective
from .models import ArchSpec, build_model, load_model, save_model
from .recipe import Recipe, RecipeError
from .taps import TapsLike, tap_counts
from .teachers import Ensemble, LiveTeacher, TeacherSource

log = logging.getLogger("potstill")

DONE_FILE = "done.json"


@dataclass
class SubRun:
    """One trained model of a run: where it lives and what its training measured."""

    model: nn.Module
    folder: Path
    info: dict[str, Any]


def _check_run_dir(run_dir: Path, recipe: BaseModel, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs in one folder: an existing run continues only with ``resume`` and the
    same recipe; ``overwrite`` deletes it (only if it is a potstill run folder)."""
    saved = run_dir / "recipe.yaml"
    if saved.exists() and not overwrite:
        if not resume:
            raise RecipeError(
                f"{run_dir} already holds a run; pass --resume to continue it "
                "(finished parts are reused) or --overwrite to start again"
            )
        before = type(recipe).model_validate(yaml.safe_load(saved.read_text())).model_dump()
        now = recipe.model_dump()
        diff = sorted(_diff_fields(before, now))
        if diff:
            raise RecipeError(
                f"{run_dir} was started with another recipe (fields that differ: "
                f"{', '.join(diff)}); use a new --out folder or --overwrite"
            )
    if overwrite and run_dir.exists():
        if not saved.exists() and any(run_dir.iterdir()):
            raise RecipeError(
                f"--overwrite: {run_dir} is not a potstill run folder (no recipe.yaml) and is "
                "not empty; refusing to delete it. Choose another --out folder."
            )
        import shutil

        distributed.barrier()  # every process has checked the folder before it goes
        if distributed.is_main():
            shutil.rmtree(run_dir)
    distributed.barrier()  # and before rank 0 writes a new recipe.yaml into it


def _start_run_dir(run_dir: Path, recipe: BaseModel) -> None:
    # written once the data has loaded, so a run that could not start does not block a retry
    if not distributed.is_main():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    atomic_write_text(run_dir / "recipe.yaml", text)


def _diff_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_fields(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b else []


def train_classifier(
    name: str,
    folder: Path,
    model: nn.Module,
    spec: ArchSpec | None,
    objective: Objective,
    train: Dataset,
    val: Dataset,
    config: TrainConfig,
    teacher: TeacherSource | None,
    resume: bool,
    student_taps: TapsLike | None = None,
) -> SubRun:
    """Train one model in ``folder`` (or load it when a finished run is there already)."""
    done = folder / DONE_FILE
    if resume and done.exists():
        info = json.loads(done.read_text())
        loaded, _ = load_model(folder / "final")
        log.info("%s: finished earlier, reusing %s", name, folder / "final")
        return SubRun(loaded, folder, info)
    distiller = Distiller(
        model,
        objective,
        train,
        teacher=teacher,
        config=config,
        run_dir=folder,
        evaluate=classification_eval(val),
        best_metric="accuracy",
        name=name,
        student_taps=student_taps,
    )
    result: FitResult = distiller.fit(resume=resume)
    info = {
        "steps": result.steps,
        "train_time_s": result.train_time_s,
        "examples_per_s": result.examples_per_s,
        "val_final": result.final_eval,
        "val_best": result.best,
        "examples": len(train),  # type: ignore[arg-type]
    }
    if distributed.is_main():  # every process holds the same trained model; rank 0 saves it
        save_model(result.student, folder / "final", spec)
        atomic_write_text(done, json.dumps(info, indent=1))
    distributed.barrier()
    return SubRun(result.student, folder, info)


def _teacher(recipe: Recipe, splits: Splits, run_dir: Path, resume: bool) -> tuple[nn.Module, dict]:
    spec = recipe.teacher
    if isinstance(spec.path, list):
        members = [load_model(p)[0] for p in spec.path]
        return Ensemble(members).eval(), {"source": f"ensemble of {', '.join(spec.path)}"}
    if spec.path:
        model, _ = load_model(spec.path)
        return model, {"source": str(spec.path)}
    arch = spec.arch.model_copy(
        update={"input_shape": list(splits.input_shape), "num_classes": len(splits.classes)}
    )
    torch.manual_seed(spec.train.seed)
    sub = train_classifier(
        "teacher",
        run_dir / "teacher",
        build_model(arch),
        arch,
        labels_only_objective(),
        splits.train,
        splits.val,
        spec.train,
        None,
        resume,
    )
    return sub.model, {"source": "trained in this run", **sub.info}


def measure_cache_speedup(
    student: nn.Module,
    objective: Objective,
    train: Dataset,
    live: TeacherSource,
    cached: TeacherSource,
    config: TrainConfig,
    steps: int = 60,
    rounds: int = 2,
) -> dict[str, float]:
    """Training throughput with the live teacher and with its cache, measured alternately on
    fresh copies of the same student, and the epoch times they imply."""
    cfg = config.model_copy(
        update={
            "max_steps": steps,
            "epochs": None,
            "progress": False,
            "eval_every": 10**9,
            "log_every": 10**9,
        }
    )
    rates: dict[str, list[float]] = {"live": [], "cached": []}
    for _ in range(rounds):
        for name, source in (("live", live), ("cached", cached)):
            r = Distiller(
                copy.deepcopy(student), copy.deepcopy(objective), train, teacher=source, config=cfg
            ).fit()
            rates[name].append(r.examples_per_s)
    n = len(train)  # type: ignore[arg-type]
    live_rate, cached_rate = max(rates["live"]), max(rates["cached"])
    return {
        "steps_measured": steps,
        "live_examples_per_s": live_rate,
        "cached_examples_per_s": cached_rate,
        "live_epoch_s": n / live_rate,
        "cached_epoch_s": n / cached_rate,
        "speedup": cached_rate / live_rate,
    }


def run_recipe(
    recipe: Recipe, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run a whole recipe in ``run_dir``; returns the results (also written to results.json)."""
    from .report import write_report

    run_dir = Path(run_dir)
    _check_run_dir(run_dir, recipe, resume, overwrite)
    t_start = time.perf_counter()
    splits = load_splits(
        recipe.data.name,
        data_dir=recipe.data.data_dir,
        val_size=recipe.data.val_size,
        seed=recipe.seed,
    )
    _start_run_dir(run_dir, recipe)
    teacher, teacher_info = _teacher(recipe, splits, run_dir, resume)
    main = distributed.is_main()  # rank 0 evaluates and reports; every process trains
    ev = recipe.evaluation
    figures = {"latency_batch": ev.latency_batch, "throughput_batch": ev.throughput_batch}
    teacher_row: dict[str, Any] = dict(teacher_info)
    if main:
        teacher_test_logits, _ = predict_logits(teacher, splits.test)
        teacher_row = {
            **model_card_figures(teacher, splits.test, teacher_logits=None, **figures),
            **teacher_info,
        }

    cache_path = run_dir / "teacher" / "cache-train" if recipe.teacher.cache else None
    t = time.perf_counter()
    source = cached_or_live(teacher, splits.train, cache_path)
    cache_info: dict[str, Any] = {"enabled": cache_path is not None}
    if isinstance(source, CachedTeacher):
        cache_info.update(path=str(cache_path), ready_s=time.perf_counter() - t)

    student_taps, teacher_taps = recipe.taps.as_taps("student"), recipe.taps.as_taps("teacher")

    @contextmanager
    def source_for(objective: Objective) -> Iterator[TeacherSource]:
        # the logit cache serves terms on logits; terms on features need the live teacher's
        # taps, whose hooks leave the shared teacher as soon as that training ends
        if not objective.needs_teacher_features:
            yield source
            return
        live = LiveTeacher(teacher, taps=teacher_taps)
        try:
            yield live
        finally:
            live.close()

    student_arch = recipe.student.arch.model_copy(
        update={"input_shape": list(splits.input_shape), "num_classes": len(splits.classes)}
    )
    settings_out = []
    for setting in recipe.settings:
        folder = run_dir / setting.name
        train = hide_labels(splits.train, setting.labelled_fraction, recipe.seed)
        assert isinstance(train, TensorDataset)
        labelled = labelled_only(train)
        runs: dict[str, Any] = {}
        torch.manual_seed(recipe.seed)
        init = build_model(student_arch)  # both students start from the same weights
        distill_cfg = recipe.train
        counts = {
            "student": tap_counts(init, student_taps),
            "teacher": tap_counts(teacher, teacher_taps),
        }
        objective = recipe.build_objective(counts)
        hint_objective = recipe.build_hint_objective(counts)
        start, hint = copy.deepcopy(init), None
        if hint_objective is not None:
            assert recipe.hint is not None
            with source_for(hint_objective) as hint_source:
                hint = train_classifier(
                    f"{setting.name}/hint", folder / "distilled" / "hint", start, student_arch,
                    hint_objective, train, splits.val, recipe.hint.train, hint_source, resume,
                    student_taps,
                )  # fmt: skip
            start = hint.model
        with source_for(objective) as main_source:
            distilled = train_classifier(
                f"{setting.name}/distilled", folder / "distilled", start, student_arch,
                objective, train, splits.val, distill_cfg, main_source, resume, student_taps,
            )  # fmt: skip
        runs["distilled"] = distilled
        if recipe.baseline:
            # same budget: as many optimizer steps of the same batch size (hint stage included),
            # on the labelled part
            steps = distilled.info["steps"] + (hint.info["steps"] if hint else 0)
            base_cfg = distill_cfg.model_copy(update={"max_steps": steps, "epochs": None})
            runs["baseline"] = train_classifier(
                f"{setting.name}/baseline", folder / "baseline", copy.deepcopy(init),
                student_arch, labels_only_objective(), labelled, splits.val, base_cfg, None,
                resume,
            )  # fmt: skip
        rows: dict[str, Any] = {}
        for kind, sub in runs.items() if main else ():
            rows[kind] = {
                **model_card_figures(
                    sub.model, splits.test, teacher_logits=teacher_test_logits, **figures
                ),
                **sub.info,
                "metrics": str(sub.folder.relative_to(run_dir) / "metrics.jsonl"),
            }
        if hint is not None and main:
            rows["distilled"]["hint"] = {
                **hint.info,
                "metrics": str(hint.folder.relative_to(run_dir) / "metrics.jsonl"),
            }
        settings_out.append(
            {
                "name": setting.name,
                "labelled_fraction": setting.labelled_fraction,
                "labelled_examples": len(labelled),
                "transfer_examples": len(train),
                "runs": rows,
            }
        )
        if (
            ev.measure_cache_speedup
            and distributed.world_size() == 1  # measured on one process
            and isinstance(source, CachedTeacher)
            and not objective.needs_teacher_features
            and "live_examples_per_s" not in cache_info
        ):
            cache_info.update(
                measure_cache_speedup(
                    init, objective, train, LiveTeacher(teacher), source, distill_cfg
                )
            )

    results = {
        "name": recipe.name,
        "potstill_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "seed": recipe.seed,
        "data": {
            "name": recipe.data.name,
            "train": len(splits.train),
            "val": len(splits.val),
            "test": len(splits.test),
        },
        "objective": [t.model_dump(exclude_unset=True) for t in recipe.objective],
        "hint_objective": [t.model_dump(exclude_unset=True) for t in recipe.hint.objective]
        if recipe.hint
        else [],
        "teacher": teacher_row,
        "student_arch": student_arch.model_dump(),
        "teacher_cache": cache_info,
        "settings": settings_out,
        "wall_time_s": time.perf_counter() - t_start,
        "processes": distributed.world_size(),
    }
    if main:
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1, default=str))
        write_report(run_dir)
    distributed.barrier()
    return results
