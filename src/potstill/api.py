"""The one-call Python API: ``potstill.distill(teacher, student, train_data, ...)`` for any
PyTorch classifier and any Dataset of ``(input, label)`` pairs."""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from .cache import cached_or_live
from .config import OptimizerConfig, ScheduleConfig, TrainConfig, same_budget
from .distiller import Distiller, FitResult
from .evaluate import accuracy, agreement, predict_logits
from .losses.objective import Objective
from .losses.terms import hinton_objective, labels_only_objective
from .teachers import LiveTeacher, TeacherSource


@dataclass
class DistillResult:
    """The trained student, its final metrics on ``eval_data``, and the run's history."""

    student: nn.Module
    metrics: dict[str, float] = field(default_factory=dict)
    fit: FitResult | None = None
    baseline: nn.Module | None = None
    baseline_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Training log rows: step, learning rate, loss and each term."""
        return self.fit.history if self.fit else []


def _eval_with_teacher(teacher_logits: torch.Tensor, data: Dataset):
    def evaluate(model: nn.Module) -> dict[str, float]:
        logits, labels = predict_logits(model, data)
        out = {"agreement": agreement(logits, teacher_logits)}
        if labels is not None:
            out["accuracy"] = accuracy(logits, labels)
        return out

    return evaluate


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train_data: Dataset,
    *,
    eval_data: Dataset | None = None,
    epochs: float = 3,
    batch_size: int = 128,
    lr: float = 1e-3,
    temperature: float = 2.0,
    alpha: float = 0.5,
    seed: int = 0,
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
    weight_decay: float = 0.0,
    schedule: Literal["constant", "linear", "cosine"] = "cosine",
    warmup_steps: int = 0,
    grad_accum: int = 1,
    clip_grad_norm: float | None = None,
    cache_teacher: bool = False,
    baseline: bool = False,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> DistillResult:
    """Distill ``teacher`` into ``student`` with Hinton's loss; returns the trained student.

    The loss is ``alpha·T²·KL(teacher_T ‖ student_T) + (1−alpha)·CE(student, label)``; labels
    equal to -100 are unlabelled (only the teacher's soft targets teach on them). With
    ``cache_teacher`` the teacher's logits are computed once (in ``run_dir`` if given) and reused
    every epoch: only valid when ``train_data`` returns the same inputs every time (no random
    augmentation). With ``baseline`` the same student is also trained without a teacher, from
    the same initial weights and for the same number of steps, for comparison.

    >>> result = potstill.distill(teacher, student, train_set, eval_data=test_set,  # doctest: +SKIP
    ...                           epochs=5, temperature=4.0, alpha=0.7)
    >>> result.metrics                                                             # doctest: +SKIP
    {'agreement': 0.93, 'accuracy': 0.86}
    """
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        clip_grad_norm=clip_grad_norm,
        optimizer=OptimizerConfig(name=optimizer, lr=lr, weight_decay=weight_decay),
        schedule=ScheduleConfig(name=schedule, warmup_steps=warmup_steps),
        seed=seed,
        progress=progress,
    )
    init = copy.deepcopy(student) if baseline else None
    source: TeacherSource = LiveTeacher(teacher)
    # without a run_dir the cache lives in a temporary folder for the length of the call
    tmp = tempfile.TemporaryDirectory(prefix="potstill-cache-") if cache_teacher else None
    try:
        if cache_teacher:
            folder = Path(run_dir) if run_dir else Path(tmp.name)  # type: ignore[union-attr]
            source = cached_or_live(teacher, train_data, folder / "teacher-cache")
        objective = hinton_objective(temperature, alpha)
        return _fit_both(
            student,
            teacher,
            objective,
            train_data,
            source,
            config,
            run_dir,
            eval_data,
            init,
            resume,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


def _fit_both(
    student: nn.Module,
    teacher: nn.Module,
    objective: Objective,
    train_data: Dataset,
    source: TeacherSource,
    config: TrainConfig,
    run_dir: str | Path | None,
    eval_data: Dataset | None,
    init: nn.Module | None,
    resume: bool,
) -> DistillResult:
    evaluate = None
    if eval_data is not None:
        evaluate = _eval_with_teacher(predict_logits(teacher, eval_data)[0], eval_data)
    fit = Distiller(
        student,
        objective,
        train_data,
        teacher=source,
        config=config,
        run_dir=Path(run_dir) / "distilled" if run_dir else None,
        evaluate=evaluate,
    ).fit(resume=resume)
    result = DistillResult(fit.student, dict(fit.final_eval or {}), fit)
    result.metrics.pop("step", None)
    if init is not None:
        base = Distiller(
            init,
            labels_only_objective(),
            train_data,
            config=same_budget(config, fit.steps),
            run_dir=Path(run_dir) / "baseline" if run_dir else None,
            evaluate=evaluate,
        ).fit(resume=resume)
        result.baseline = base.student
        result.baseline_metrics = {k: v for k, v in (base.final_eval or {}).items() if k != "step"}
    return result
