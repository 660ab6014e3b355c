"""Distill inside an existing ``transformers.Trainer`` script: :class:`DistillationTrainer` is a
``Trainer`` whose loss is a potstill objective (Hinton's loss, any divergence or feature term)
fed by any potstill teacher source — a live teacher model, a teacher cache on disk, a served
teacher — with every term logged through the Trainer's own logger (and so to its
``report_to``). The Trainer's loop, optimizer, schedule, accumulation, devices and
checkpoints are its own: potstill adds no second loop. :class:`TeacherAgreement` is a callback
that reports the student against its teacher at each evaluation.

>>> trainer = DistillationTrainer(                                  # doctest: +SKIP
...     model=student, args=TrainingArguments("out", num_train_epochs=3),
...     train_dataset=train, teacher=teacher_model,
...     objective=hinton_objective(temperature=2.0, alpha=0.5))
>>> trainer.train()                                                  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..losses.objective import Objective
from ..placement import Placement
from ..signal import StudentView
from ..teachers import ForwardFn, LiveTeacher, TeacherSource


def logits_forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """A Hugging Face model's logits on a batch, given the inputs its ``forward`` takes
    (``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values``; labels left out,
    the objective reads them)."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
    return model(**{k: batch[k] for k in keys if k in batch}).logits


def _keeping_columns(training_args: Any) -> Any:
    """``training_args`` with ``remove_unused_columns`` off."""
    if not training_args.remove_unused_columns:
        return training_args
    return dataclasses.replace(training_args, remove_unused_columns=False)


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that trains ``model`` (the student) on a potstill
    ``objective`` (:func:`potstill.losses.terms.hinton_objective`, or an
    :class:`~potstill.losses.objective.Objective` of any terms) against ``teacher``: a model
    (run live, frozen, on the student's device unless already elsewhere) or any potstill
    teacher source (``LiveTeacher``, ``CachedTeacher`` — its batches need the dataset's
    ``index`` column — or a served teacher). ``student_forward`` / ``teacher_forward`` turn a
    batch into logits (default: :func:`logits_forward`). Every active term's mean over the
    logging interval is logged beside ``loss`` under the term's name. Labels are read by the
    objective from the batch (``labels`` or ``label``; -100 unlabelled). Every column of the
    data reaches the loss (``remove_unused_columns`` is turned off)."""

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | TeacherSource,
        objective: Objective,
        student_forward: ForwardFn = logits_forward,
        teacher_forward: ForwardFn | None = None,
        **kwargs: Any,
    ) -> None:
        # every column reaches the loss: the forwards pick theirs, and a teacher cache reads
        # the batch's ``index`` (the Trainer would drop what the model's forward does not take)
        if kwargs.get("args") is not None:
            kwargs["args"] = _keeping_columns(kwargs["args"])
        elif len(args) > 1 and args[1] is not None:
            args = (args[0], _keeping_columns(args[1]), *args[2:])
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.student_forward = student_forward
        if isinstance(teacher, nn.Module):
            if not any(p.device != torch.device("cpu") for p in teacher.parameters()):
                teacher.to(self.args.device)
            teacher = LiveTeacher(teacher, forward=teacher_forward or logits_forward)
        elif teacher_forward is not None:
            raise ValueError("teacher_forward is for a teacher model; a source has its own")
        self.teacher = teacher
        self.placement = Placement(self.args.device)
        # our loss is a mean over the micro-batch: let the Trainer divide it over accumulation
        self.model_accepts_loss_kwargs = False
        self._sums: dict[str, float] = {}
        self._count = 0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The objective's loss on ``inputs`` against the teacher's signal on them."""
        batch = dict(inputs)
        if "labels" in batch and "label" not in batch:
            batch["label"] = batch["labels"]  # potstill's terms read ``label``
        signal = self.placement.signal(self.teacher.signal(batch)) if self.teacher else None
        out = self.student_forward(model, batch)
        view = out if isinstance(out, StudentView) else StudentView(logits=out)
        self.objective.to(self.args.device)
        loss, values = self.objective(view, signal, batch)
        if model.training:
            for name, value in values.items():
                self._sums[name] = self._sums.get(name, 0.0) + float(value)
            self._count += 1
        return (loss, {"logits": view.logits}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with each term's mean since the last one beside ``loss``."""
        if "loss" in logs and self._count:
            logs = {**logs, **{k: v / self._count for k, v in self._sums.items()}}
            self._sums, self._count = {}, 0
        super().log(logs, *args, **kwargs)


class TeacherAgreement(TrainerCallback):
    """At each evaluation of a classifier or causal LM: the share of ``eval_dataset`` examples
    (tokens, for a causal LM: the positions with a label) where the student's top prediction
    is the teacher's (``eval_agreement``), logged with the Trainer's other metrics."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                    **kwargs: Any) -> None:  # fmt: skip
        t = self.trainer
        if metrics is None or t.eval_dataset is None:
            return
        agree = total = 0
        model = t.model
        was = model.training
        model.eval()
        with torch.no_grad():
            for inputs in t.get_eval_dataloader():
                batch = t.placement.batch(dict(inputs))
                student = t.student_forward(model, batch)
                teacher = t.teacher.signal(batch)
                s = (student.logits if isinstance(student, StudentView) else student).argmax(-1)
                if teacher.logits is not None:
                    k = teacher.logits.to(s.device).argmax(-1)
                else:
                    k = teacher.topk.ids[..., 0].to(s.device)  # type: ignore[union-attr]
                labels = batch.get("labels", batch.get("label"))
                mask = torch.ones_like(s, dtype=torch.bool)
                if s.dim() == 2 and isinstance(labels, torch.Tensor):  # tokens: labelled only
                    mask = torch.zeros_like(s, dtype=torch.bool)
                    mask[:, :-1] = labels[:, 1:] != -100
                agree += int(((s == k) & mask).sum())
                total += int(mask.sum())
        model.train(was)
        value = agree / max(total, 1)
        metrics["eval_agreement"] = value
        t.log({"eval_agreement": value})


__all__ = ["DistillationTrainer", "TeacherAgreement", "logits_forward"]
