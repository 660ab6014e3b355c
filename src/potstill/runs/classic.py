"""The classic runner: train or load the teacher, cache its logits, train for each setting the
student without a teacher (the baseline) and with distillation at the same budget, evaluate all
of them on the test set, write ``results.json``, the report and each student's model card."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed
from ..cache import CachedTeacher, cached_or_live
from ..config import TrainConfig, same_budget
from ..data.image_tables import image_tables
from ..data.splits import Splits, hide_labels, labelled_only, load_splits
from ..distiller import Distiller
from ..evaluate import classification_eval, predict_logits
from ..losses.objective import Objective
from ..losses.terms import labels_only_objective
from ..models import ArchSpec
from ..placement import CPU, Placement
from ..recipe.classic import ClassicRecipe, SettingSpec
from ..report import write_report
from ..report.card import CardMeta, hub_datasets, model_card, write_model_card
from ..taps import TapsLike, tap_counts
from ..tasks import get_task
from ..teachers import Ensemble, LiveTeacher, TeacherSource
from ..vision import TorchvisionSpec, hf_image_classifier, load_classifier
from .classic_models import build_classifier, in_teacher_order, sized
from .folder import RunFolder, fit_info

log = logging.getLogger("potstill")

TASK = get_task("classifier")


@dataclass
class SubRun:
    """One trained model of a run: where it lives and what its training measured."""

    model: nn.Module
    folder: Path
    info: dict[str, Any]


def train_classifier(
    run: RunFolder,
    part: str,
    model: nn.Module,
    spec: ArchSpec | TorchvisionSpec | None,
    objective: Objective,
    train: Dataset,
    val: Dataset,
    config: TrainConfig,
    teacher: TeacherSource | None,
    student_taps: TapsLike | None = None,
) -> SubRun:
    """Train one model in the run's subfolder ``part`` (or reload it when it finished before)."""
    folder = run.path / part
    info = run.finished(part)
    if info is not None:
        log.info("%s: finished earlier, reusing %s", part, folder / "final")
    else:
        result = Distiller(
            model, objective, train, teacher=teacher, config=config, run_dir=folder,
            evaluate=classification_eval(val), best_metric="accuracy", name=part,
            student_forward=TASK.student_forward, student_taps=student_taps,
            placement=run.placement,
        ).fit(resume=run.resume)  # fmt: skip
        info = fit_info(result, len(train))  # type: ignore[arg-type]
        if distributed.is_main():  # every process holds the same trained model; rank 0 saves it
            TASK.export(result.student, folder / "final", spec=spec)
            run.mark_finished(part, info)
        distributed.barrier()
    # the model as exported, as a resumed run reloads it: every later figure and part (a
    # teacher's cache) comes from the same weights in the same memory, killed or not
    return SubRun(run.place_student(load_classifier(folder / "final")), folder, info)


def _teacher(recipe: ClassicRecipe, splits: Splits, run: RunFolder) -> tuple[nn.Module, dict]:
    teacher, info = _build_teacher(recipe, splits, run)
    return run.place_teacher(teacher), info


def _build_teacher(recipe: ClassicRecipe, splits: Splits, run: RunFolder) -> tuple[nn.Module, dict]:
    spec = recipe.teacher
    if isinstance(spec.path, list):
        members = [load_classifier(p) for p in spec.path]
        return Ensemble(members).eval(), {"source": f"ensemble of {', '.join(spec.path)}"}
    if spec.path:
        return load_classifier(spec.path), {"source": str(spec.path)}
    if not spec.trained_here:  # a Hugging Face classifier of these classes, as it is
        model = hf_image_classifier(
            splits.classes, model=spec.model, processor=spec.processor, new_head=False,
            trust_remote_code=spec.trust_remote_code, who="teacher",
        )  # fmt: skip
        return model, {"source": str(spec.model)}
    model, export = build_classifier(spec, splits, spec.train.seed, "teacher")
    sub = train_classifier(
        run, "teacher", model, export, labels_only_objective(), splits.train, splits.val,
        spec.train, None,
    )  # fmt: skip
    fine = "fine-tuned in this run" if spec.finetune else "trained in this run"
    return sub.model, {"source": fine, **sub.info}


def measure_cache_speedup(
    student: nn.Module,
    objective: Objective,
    train: Dataset,
    live: TeacherSource,
    cached: TeacherSource,
    config: TrainConfig,
    steps: int = 60,
    rounds: int = 2,
    placement: Placement = CPU,
) -> dict[str, float]:
    """Training throughput with the live teacher and with its cache, measured alternately on
    fresh copies of the same student, and the epoch times they imply."""
    cfg = config.model_copy(
        update={
            "max_steps": steps, "epochs": None, "progress": False, "eval_every": 10**9,
            "log_every": 10**9,
        }
    )  # fmt: skip
    rates: dict[str, list[float]] = {"live": [], "cached": []}
    for _ in range(rounds):
        for name, source in (("live", live), ("cached", cached)):
            r = Distiller(
                copy.deepcopy(student), copy.deepcopy(objective), train, teacher=source,
                config=cfg, placement=placement,
            ).fit()  # fmt: skip
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


def run(
    recipe: ClassicRecipe, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run a classic recipe in ``run_dir``; returns the results (also written to results.json).

    An existing run folder is continued only with ``resume`` (finished parts are reused, an
    interrupted one continues from its last checkpoint) or emptied first with ``overwrite``.
    """
    with RunFolder(run_dir, recipe, resume=resume, overwrite=overwrite) as folder:
        d = recipe.data
        rows = None
        if d.source is not None:
            rows = image_tables(**d.source.rows_options(), seed=recipe.seed)
        splits = load_splits(
            d.name, data_dir=d.data_dir, val_size=d.val_size, seed=recipe.seed,
            columns=d.columns if rows is None else None, rows=rows,
        )  # fmt: skip
        if recipe.teacher.family == "model" and not recipe.teacher.trained_here:
            splits = in_teacher_order(splits, recipe.teacher)
        folder.start()
        return _run(recipe, folder, splits)


@dataclass
class Shared:
    """What every setting of a classic run shares: the teacher, its training-set source (live or
    cached), the taps, the evaluation options and the teacher's test logits (rank 0)."""

    recipe: ClassicRecipe
    run: RunFolder
    splits: Splits
    teacher: nn.Module
    teacher_row: dict[str, Any]
    source: TeacherSource
    cache_info: dict[str, Any]
    figures: dict[str, int]
    teacher_logits: torch.Tensor | None

    @contextmanager
    def source_for(self, objective: Objective) -> Iterator[TeacherSource]:
        """The teacher source for ``objective``: the (cached) one for terms on logits; terms on
        features need the live teacher's taps, whose hooks leave the shared teacher as soon as
        that training ends."""
        if not objective.needs_teacher_features:
            yield self.source
            return
        taps = self.recipe.taps.as_taps("teacher")
        live = LiveTeacher(self.teacher, forward=TASK.teacher_forward, taps=taps)
        try:
            yield live
        finally:
            live.close()


def _run(recipe: ClassicRecipe, run: RunFolder, splits: Splits) -> dict[str, Any]:
    shared = _shared(recipe, run, splits)
    student_arch = sized(recipe.student.arch, splits)
    settings_out = [_setting(shared, setting) for setting in recipe.settings]
    s = recipe.student
    student = (
        student_arch.model_dump()
        if s.family == "arch"
        else {"kind": s.family, "name": s.model or s.torchvision, "config": s.config}
    )
    results = run.write_results(
        {
            "data": {
                "name": recipe.data.described,
                "train": len(splits.train),
                "val": len(splits.val),
                "test": len(splits.test),
            },
            "objective": [t.model_dump(exclude_unset=True) for t in recipe.objective],
            "hint_objective": [t.model_dump(exclude_unset=True) for t in recipe.hint.objective]
            if recipe.hint
            else [],
            "teacher": shared.teacher_row,
            "student_arch": student,
            "teacher_cache": shared.cache_info,
            "settings": settings_out,
        }
    )
    if distributed.is_main():
        write_report(run.path, results)
    distributed.barrier()
    return results


def _shared(recipe: ClassicRecipe, run: RunFolder, splits: Splits) -> Shared:
    """The teacher (trained, loaded or an ensemble), its test row and its training-set source."""
    teacher, teacher_info = _teacher(recipe, splits, run)
    ev = recipe.evaluation
    figures = {"latency_batch": ev.latency_batch, "throughput_batch": ev.throughput_batch}
    teacher_row: dict[str, Any] = dict(teacher_info)
    teacher_logits = None
    if distributed.is_main():  # rank 0 evaluates and reports; every process trains
        teacher_logits, _ = predict_logits(teacher, splits.test)
        row = TASK.metrics(
            {"teacher": teacher}, splits.test, teacher=teacher, teacher_logits=teacher_logits,
            **figures,
        )  # fmt: skip
        teacher_row = {**row["teacher"], **teacher_info}
    cache_path = run.path / "teacher" / "cache-train" if recipe.teacher.cache else None
    t = time.perf_counter()
    source = cached_or_live(teacher, splits.train, cache_path, forward=TASK.teacher_forward)
    cache_info: dict[str, Any] = {"enabled": cache_path is not None}
    if isinstance(source, CachedTeacher):
        cache_info.update(path=str(cache_path), ready_s=time.perf_counter() - t)
    return Shared(
        recipe, run, splits, teacher, teacher_row, source, cache_info, figures, teacher_logits
    )


def _setting(shared: Shared, setting: SettingSpec) -> dict[str, Any]:
    """One setting: the distilled student (after its hint stage, if any) and the baseline at
    the same budget, from the same initial weights; their rows and model cards."""
    recipe, run, splits = shared.recipe, shared.run, shared.splits
    train = hide_labels(splits.train, setting.labelled_fraction, recipe.seed)
    labelled = labelled_only(train)
    student_taps = recipe.taps.as_taps("student")
    runs: dict[str, SubRun] = {}
    # both students start from the same weights
    init, student_arch = build_classifier(recipe.student, splits, recipe.seed, "student")
    counts = {
        "student": tap_counts(init, student_taps),
        "teacher": tap_counts(shared.teacher, recipe.taps.as_taps("teacher")),
    }
    objective = recipe.build_objective(counts)
    hint_objective = recipe.build_hint_objective(counts)
    start, hint = copy.deepcopy(init), None
    if hint_objective is not None:
        assert recipe.hint is not None
        with shared.source_for(hint_objective) as hint_source:
            hint = train_classifier(
                run, f"{setting.name}/distilled/hint", start, student_arch, hint_objective,
                train, splits.val, recipe.hint.train, hint_source, student_taps,
            )  # fmt: skip
        start = hint.model
    with shared.source_for(objective) as main_source:
        runs["distilled"] = train_classifier(
            run, f"{setting.name}/distilled", start, student_arch, objective, train,
            splits.val, recipe.train, main_source, student_taps,
        )  # fmt: skip
    if recipe.baseline:
        # same budget: as many optimizer steps of the same batch size (hint stage included),
        # on the labelled part
        steps = runs["distilled"].info["steps"] + (hint.info["steps"] if hint else 0)
        runs["baseline"] = train_classifier(
            run, f"{setting.name}/baseline", copy.deepcopy(init), student_arch,
            labels_only_objective(), labelled, splits.val, same_budget(recipe.train, steps), None,
        )  # fmt: skip
    rows = _rows(shared, setting.name, runs, hint, len(train)) if distributed.is_main() else {}
    cache = shared.cache_info
    if (
        recipe.evaluation.measure_cache_speedup
        and distributed.world_size() == 1  # measured on one process
        and isinstance(shared.source, CachedTeacher)
        and not objective.needs_teacher_features
        and "live_examples_per_s" not in cache
    ):
        live = LiveTeacher(shared.teacher)
        cache.update(
            measure_cache_speedup(
                init,
                objective,
                train,
                live,
                shared.source,
                recipe.train,
                placement=run.placement,
            )  # fmt: skip
        )
    return {
        "name": setting.name,
        "labelled_fraction": setting.labelled_fraction,
        "labelled_examples": len(labelled),
        "transfer_examples": len(train),
        "runs": rows,
    }


def _rows(
    shared: Shared, setting: str, runs: dict[str, SubRun], hint: SubRun | None, examples: int
) -> dict[str, Any]:
    """The setting's students measured on the test set (rank 0), and their model cards."""
    run = shared.run
    measured = TASK.metrics(
        {kind: sub.model for kind, sub in runs.items()}, shared.splits.test,
        teacher_logits=shared.teacher_logits, **shared.figures,
    )  # fmt: skip
    rows: dict[str, Any] = {}
    for kind, sub in runs.items():
        rows[kind] = {
            **measured[kind],
            **sub.info,
            "metrics": str(sub.folder.relative_to(run.path) / "metrics.jsonl"),
        }
    if hint is not None:
        rows["distilled"]["hint"] = {
            **hint.info,
            "metrics": str(hint.folder.relative_to(run.path) / "metrics.jsonl"),
        }
    _write_cards(shared.recipe, run, setting, runs, rows, shared.teacher_row, examples)
    return rows


def _write_cards(
    recipe: ClassicRecipe,
    run: RunFolder,
    setting: str,
    runs: dict[str, SubRun],
    rows: dict[str, Any],
    teacher_row: dict[str, Any],
    examples: int,
) -> None:
    """The model card of each student of a setting, in its exported folder."""
    words = recipe.student.describe(recipe.student.arch)
    student = f"{words}, {rows['distilled']['parameters']:,} parameters"
    teacher = f"a teacher ({teacher_row.get('source')}, {teacher_row['parameters']:,} parameters)"
    for kind, sub in runs.items():
        row = rows[kind]
        distilled = kind == "distilled"
        summary = (
            f"Test accuracy {100 * row['accuracy']:.2f}% (teacher "
            f"{100 * teacher_row['accuracy']:.2f}%)"
            + (f", top-1 agreement with the teacher {100 * row['agreement']:.2f}%." if
               "agreement" in row else ".")
        )  # fmt: skip
        card = model_card(
            title=f"{recipe.name}: {setting}, {'distilled' if distilled else 'baseline'}",
            teacher=teacher if distilled else "no teacher (the same-budget baseline)",
            student=student,
            data=f"{recipe.data.described} ({examples:,} training examples, setting {setting})",
            steps=row.get("steps"),
            objective=[t.model_dump(exclude_unset=True) for t in recipe.objective]
            if distilled
            else [{"kind": "ce", "weight": 1.0}],
            figures={k: v for k, v in row.items() if k not in ("metrics", "val_best")},
            summary=summary,
            command=run.rerun_command,
            meta=CardMeta(
                task="image-classification",
                library="transformers" if recipe.student.model or recipe.student.config else None,
                base_models=[*([recipe.teacher.model] if distilled else []), recipe.student.model],
                datasets=hub_datasets(recipe.data.source),
                data_name=recipe.data.described, metrics={"accuracy": row["accuracy"]},
                recipe=recipe.model_dump(mode="json"),
            ),
        )  # fmt: skip
        write_model_card(sub.folder / "final", card)
