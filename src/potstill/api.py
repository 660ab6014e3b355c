"""The one-call Python API: ``potstill.distill(teacher, student, train_data, ...)`` for any
PyTorch classifier and any Dataset of ``(input, label)`` pairs, and for Hugging Face sequence
classifiers, image classifiers and causal LMs on a ``datasets.Dataset`` (or any Dataset of
dict rows) as they are: each model reads the named columns through its own tokenizer or image
processor, no forward to write."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from .cache import cached_or_live
from .config import TRAINING_ARGUMENTS, TrainConfig, from_training_arguments, same_budget
from .distiller import Distiller, FitResult
from .evaluate import accuracy, agreement, predict_logits
from .llm.forward import causal_lm_forward
from .losses.objective import Objective
from .losses.terms import build_term, hinton_objective, labels_only_objective
from .placement import Placement, resolve_device
from .tasks.causal_lm import api_datasets, is_causal_lm
from .tasks.text_classifier import api_splits, is_sequence_classifier
from .teachers import ForwardFn, LiveTeacher, TeacherSource, default_forward
from .vision import ImageClassifier, api_image_splits, is_image_classifier


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


Metric = Callable[[torch.Tensor, torch.Tensor], float]
"""A user metric: ``metric(logits, labels) -> float`` over the whole evaluation set."""


def _eval_with_teacher(
    teacher_logits: torch.Tensor,
    data: Dataset,
    forward: ForwardFn = default_forward,
    metrics: Mapping[str, Metric] | None = None,
):
    def evaluate(model: nn.Module) -> dict[str, float]:
        logits, labels = predict_logits(model, data, forward=forward)
        out = {"agreement": agreement(logits, teacher_logits)}
        if labels is not None:
            out["accuracy"] = accuracy(logits, labels)
            for name, metric in (metrics or {}).items():
                out[name] = float(metric(logits, labels))
        return out

    return evaluate


@dataclass
class _Task:
    """How the models read a batch: the data as batches and each model's forward."""

    train: Dataset
    eval: Dataset | None
    teacher_forward: ForwardFn = default_forward
    student_forward: ForwardFn = default_forward
    tokens: bool = False
    teacher: nn.Module | None = None
    student: nn.Module | None = None
    """The models as trained, when they are not the ones given (wrapped with their image
    processors); the result gives back the student that was passed in."""


def _task(
    teacher: nn.Module,
    student: nn.Module,
    train_data: Any,
    eval_data: Any,
    task: str | None,
    hf: dict[str, Any],
) -> _Task:
    """The task of the call, inferred from the teacher unless given: a Hugging Face sequence
    classifier or causal LM reads rows of named fields through its tokenizer (a causal LM's
    student must share the teacher's); anything else is a plain classifier on ``(input,
    label)`` batches."""
    if task is None:
        task = "text-classifier" if is_sequence_classifier(teacher) else "classifier"
        task = "causal-lm" if is_causal_lm(teacher) else task
        task = "image-classifier" if is_image_classifier(teacher) else task
    if task == "classifier":
        return _Task(train_data, eval_data)
    tables = {"train": train_data, **({"eval": eval_data} if eval_data is not None else {})}
    if task == "image-classifier":
        img = api_image_splits(teacher, student, tables, columns=hf["columns"], **hf["images"])
        return _Task(img.splits["train"], img.splits.get("eval"), teacher=img.teacher,
                     student=img.student)  # fmt: skip
    hf.pop("images")
    if task == "causal-lm":
        own = hf.pop("student_tokenizer")
        if (
            own is not None
            and hf["tokenizer"] is not None
            and (own.get_vocab() != hf["tokenizer"].get_vocab())
        ):
            raise ValueError(
                "student_tokenizer: a causal-LM student must share the teacher's tokenizer "
                "(token distributions are compared position by position)"
            )
        data = api_datasets(teacher, tables, **hf)
        return _Task(data["train"], data.get("eval"), causal_lm_forward, causal_lm_forward,
                     tokens=True)  # fmt: skip
    if task != "text-classifier":
        raise ValueError(
            "task must be 'classifier', 'text-classifier', 'image-classifier' or 'causal-lm', "
            f"got {task!r}"
        )
    tok, _ = api_splits(teacher, student, tables, **hf)
    return _Task(tok.splits["train"], tok.splits.get("eval"), tok.teacher_forward,
                 tok.student_forward)  # fmt: skip


def with_training_arguments(
    settings: dict[str, Any], given: Mapping[str, Any], who: str = "distill()"
) -> dict[str, Any]:
    """``settings`` (a training section) with ``TrainingArguments``' names given as keywords
    (:data:`potstill.config.TRAINING_ARGUMENTS`) put over it; TypeError for any other name."""
    unknown = [k for k in given if k not in TRAINING_ARGUMENTS]
    if unknown:
        raise TypeError(
            f"{who} got an unexpected keyword argument {unknown[0]!r} (it takes its own names "
            f"and TrainingArguments': {', '.join(TRAINING_ARGUMENTS)})"
        )
    out = copy.deepcopy(settings)
    for key, value in from_training_arguments(dict(given), who).items():
        if isinstance(value, dict):
            out[key] = {**(out.get(key) or {}), **value}
        else:
            out[key] = value
    return out


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
    report_to: str | list[str] = "auto",
    device: str = "auto",
    teacher_device: str | None = None,
    task: Literal["classifier", "text-classifier", "image-classifier", "causal-lm"] | None = None,
    tokenizer: Any = None,
    student_tokenizer: Any = None,
    columns: Mapping[str, str] | None = None,
    max_length: int = 128,
    metrics: Mapping[str, Metric] | None = None,
    image_processor: Any = None,
    student_image_processor: Any = None,
    image_size: tuple[int, int] | None = None,
    image_mode: Literal["L", "RGB"] | None = None,
    **training_arguments: Any,
) -> DistillResult:
    """Distill ``teacher`` into ``student`` with Hinton's loss; returns the trained student.

    The loss is ``alpha·T²·KL(teacher_T ‖ student_T) + (1−alpha)·CE(student, label)``; labels
    equal to -100 are unlabelled (only the teacher's soft targets teach on them). With
    ``cache_teacher`` the teacher's logits are computed once (in ``run_dir`` if given) and reused
    every epoch: only valid when ``train_data`` returns the same inputs every time (no random
    augmentation). With ``baseline`` the same student is also trained without a teacher, from
    the same initial weights and for the same number of steps, for comparison.

    ``device`` (``auto``: CUDA when a GPU is visible, else MPS, else the CPU; or ``cpu``,
    ``cuda``, ``cuda:N``, ``mps``) places the student, its batches and the teacher's signals;
    the teacher goes there too, or to ``teacher_device``. A device this machine lacks is
    refused before anything trains.

    Hugging Face sequence classifiers (``...ForSequenceClassification``; or
    ``task="text-classifier"``) take ``train_data`` / ``eval_data`` as a ``datasets.Dataset``
    or any Dataset of dict rows: the text column (``columns={"text": ..., "label": ...,
    "text_pair": ...}``, default ``text`` / ``label`` or the usual names) is tokenized by each
    model's own tokenizer (``tokenizer`` / ``student_tokenizer``, default: the ones saved with
    the models; a student with another vocabulary gets its own tokenization), cut at
    ``max_length`` tokens; string labels are mapped through the teacher's ``id2label``.
    ``metrics`` adds ``name: metric(logits, labels) -> float`` to every evaluation.

    ``transformers.TrainingArguments``' names are taken too where they mean the same
    (``num_train_epochs=2, per_device_train_batch_size=16, learning_rate=5e-5,
    gradient_accumulation_steps=4, max_grad_norm=1.0, bf16=True``, …:
    :data:`potstill.config.TRAINING_ARGUMENTS`), over the arguments above.

    ``report_to`` (with a ``run_dir``): experiment trackers for every loss term, learning rate,
    throughput and evaluation metric — ``auto`` (those installed and set up), ``all``,
    ``none``, or a list of ``tensorboard``, ``wandb``, ``mlflow`` (:mod:`potstill.trackers`).

    Hugging Face causal LMs (``...ForCausalLM``, or ``task="causal-lm"``) take rows with a
    ``text`` column (a corpus: documents ended by EOS, concatenated, cut into windows of
    ``max_length`` tokens, every token predicted) or conversations (``messages``, or
    ``prompt`` + ``response``: every assistant turn trained), tokenized by the teacher's
    tokenizer, which the student shares. The loss is ``alpha·T²·KL(teacher_T ‖ student_T) +
    (1−alpha)·CE`` on the next tokens; evaluations report perplexity, top-1 agreement with the
    teacher and KL to it.

    Hugging Face image classifiers (``...ForImageClassification``, or
    ``task="image-classifier"``) take rows with an image column (PIL images, as
    ``datasets`` gives them; ``columns={"image": ..., "label": ...}``) decoded to floats in
    [0, 1] (``image_mode`` converts them, ``image_size`` resizes them when they differ), and
    each model applies its own image processor (``image_processor`` /
    ``student_image_processor``, default: the ones saved with the models; none for a model
    built from a config). ``result.student`` is the Hugging Face model, trained.

    >>> result = potstill.distill(teacher, student, train_set, eval_data=test_set,  # doctest: +SKIP
    ...                           epochs=5, temperature=4.0, alpha=0.7)
    >>> result.metrics                                                             # doctest: +SKIP
    {'agreement': 0.93, 'accuracy': 0.86}
    """
    images = {"image_size": image_size, "image_mode": image_mode,
              "image_processor": image_processor,
              "student_image_processor": student_image_processor}  # fmt: skip
    hf = {"tokenizer": tokenizer, "student_tokenizer": student_tokenizer, "columns": columns,
          "max_length": max_length, "images": images}  # fmt: skip
    placement = Placement.of(device, "device")
    plan = _task(teacher, student, train_data, eval_data, task, hf)
    teacher, student = plan.teacher or teacher, plan.student or student
    where = resolve_device(teacher_device, "teacher_device") if teacher_device else None
    teacher.to(where or placement.device)  # the student is placed by the Distiller
    config = TrainConfig.model_validate(with_training_arguments({
        "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum,
        "clip_grad_norm": clip_grad_norm, "seed": seed, "progress": progress,
        "report_to": report_to, "schedule": {"name": schedule, "warmup_steps": warmup_steps},
        "optimizer": {"name": optimizer, "lr": lr, "weight_decay": weight_decay},
    }, training_arguments))  # fmt: skip
    init = copy.deepcopy(student) if baseline else None  # the wrapped one for an image model
    source: TeacherSource = LiveTeacher(teacher, forward=plan.teacher_forward)
    # without a run_dir the cache lives in a temporary folder for the length of the call
    tmp = tempfile.TemporaryDirectory(prefix="potstill-cache-") if cache_teacher else None
    try:
        if cache_teacher:
            folder = Path(run_dir) if run_dir else Path(tmp.name)  # type: ignore[union-attr]
            source = cached_or_live(
                teacher, plan.train, folder / "teacher-cache", forward=plan.teacher_forward
            )
        objective = hinton_objective(temperature, alpha)
        if plan.tokens:  # a causal LM: the same mixture on next-token distributions (T² scaled)
            objective = Objective([
                build_term("fkl", weight=alpha * temperature**2, temperature=temperature,
                           tokens=True, name="kd"),
                build_term("ce", weight=1 - alpha, tokens=True),
            ])  # fmt: skip
        result = _fit_both(
            student,
            teacher,
            objective,
            plan,
            source,
            config,
            run_dir,
            init,
            resume,
            metrics,
            placement,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    # give back the models of the kind passed in (an image classifier without its wrapper)
    if isinstance(result.student, ImageClassifier):
        result.student = result.student.model
    if isinstance(result.baseline, ImageClassifier):
        result.baseline = result.baseline.model
    return result


def _lm_eval(teacher: nn.Module, data: Dataset):
    from .llm.evaluate import lm_figures

    def evaluate(model: nn.Module) -> dict[str, float]:
        row = lm_figures({"student": model}, data, teacher=teacher)["student"]  # type: ignore[arg-type]
        return {"perplexity": row["perplexity"], "agreement": row["top1_agreement"],
                "kl_to_teacher": row["kl_to_teacher"]}  # fmt: skip

    return evaluate


def _fit_both(
    student: nn.Module,
    teacher: nn.Module,
    objective: Objective,
    plan: _Task,
    source: TeacherSource,
    config: TrainConfig,
    run_dir: str | Path | None,
    init: nn.Module | None,
    resume: bool,
    metrics: Mapping[str, Metric] | None,
    placement: Placement,
) -> DistillResult:
    evaluate = None
    if plan.eval is not None and plan.tokens:
        evaluate = _lm_eval(teacher, plan.eval)
    elif plan.eval is not None:
        known, _ = predict_logits(teacher, plan.eval, forward=plan.teacher_forward)
        evaluate = _eval_with_teacher(known, plan.eval, plan.student_forward, metrics)
    common = {"evaluate": evaluate, "student_forward": plan.student_forward,
              "placement": placement}  # fmt: skip
    fit = Distiller(
        student, objective, plan.train, teacher=source, config=config,
        run_dir=Path(run_dir) / "distilled" if run_dir else None, **common,
    ).fit(resume=resume)  # fmt: skip
    result = DistillResult(fit.student, dict(fit.final_eval or {}), fit)
    result.metrics.pop("step", None)
    if init is not None:
        base = Distiller(
            init, labels_only_objective(), plan.train, config=same_budget(config, fit.steps),
            run_dir=Path(run_dir) / "baseline" if run_dir else None, **common,
        ).fit(resume=resume)  # fmt: skip
        result.baseline = base.student
        result.baseline_metrics = {k: v for k, v in (base.final_eval or {}).items() if k != "step"}
    return result
