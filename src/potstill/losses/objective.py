"""Objectives: a weighted sum of named loss terms, each reported on its own, because KD and CE
terms can differ in scale by orders of magnitude and must not hide in one number."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..signal import Signal, StudentView, TopK

TermFn = Callable[[StudentView, "Signal | None", Mapping[str, Any]], torch.Tensor]


def batch_examples(batch: Mapping[str, Any]) -> int:
    """The number of examples in ``batch`` (the default unit of a term's mean)."""
    if "index" in batch:
        return len(batch["index"])
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return int(first.shape[0])


@dataclass
class Term:
    """One loss term: a name for the logs, a weight, and a function of (student, teacher, batch).

    ``needs_teacher`` is False for terms that read only the student and the labels (CE), so a
    baseline without a teacher runs the same objective machinery. ``student_features`` and
    ``teacher_features`` name the taps the term reads (checked before training starts);
    ``module`` holds the term's trainable parts (projectors), which train with the student and are
    saved in checkpoints but never in the exported student. ``count(batch)`` is the number of
    items the term's value averages over in ``batch`` (default: its examples; tokens for token
    terms, labelled examples for CE): the Distiller weights each micro-batch and process by it,
    so a step's loss is the mean over all its items however they are split.
    """

    name: str
    fn: TermFn
    weight: float = 1.0
    needs_teacher: bool = True
    student_features: tuple[str, ...] = ()
    teacher_features: tuple[str, ...] = ()
    module: nn.Module | None = None
    count: Callable[[Mapping[str, Any]], torch.Tensor | int] = batch_examples


def teacher_target(signal: Signal | None, term: str) -> torch.Tensor | TopK:
    """The teacher's output a logit term compares with: dense logits, or the top-k form of a
    teacher cache. ValueError naming ``term`` when the signal has neither."""
    if signal is not None and signal.topk is not None:
        return signal.topk
    if signal is None or signal.logits is None:
        raise ValueError(f"the {term!r} term needs the teacher's logits (or a top-k cache)")
    return signal.logits


class Objective(nn.Module):
    """A weighted sum of terms. Calling it returns ``(total, {name: detached value})``.

    It is an ``nn.Module`` so terms that own parameters (projectors) can register them here
    and train with the student.
    """

    def __init__(self, terms: list[Term]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("an objective needs at least one term")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"objective term names must be unique, got {names}")
        self.terms = terms
        # registered so their parameters reach the optimizer, checkpoints and .to(device)
        # (torch forbids "." in module names, which term names may hold)
        self.term_modules = nn.ModuleDict(
            {t.name.replace(".", "_"): t.module for t in terms if t.module is not None}
        )
        if len(self.term_modules) != sum(t.module is not None for t in terms):
            raise ValueError(f"objective term names {names} clash once '.' becomes '_'")

    @property
    def needs_teacher(self) -> bool:
        """Whether any weighted term reads the teacher."""
        return any(t.needs_teacher for t in self.active_terms)

    @property
    def active_terms(self) -> list[Term]:
        """The terms with a non-zero weight."""
        return [t for t in self.terms if t.weight != 0]

    @property
    def needs_teacher_features(self) -> bool:
        """Whether any weighted term reads the teacher's intermediate features."""
        return any(n != "logits" for t in self.active_terms for n in t.teacher_features)

    def check_features(self, student: set[str], teacher: set[str]) -> None:
        """Raise a ValueError naming any feature a term reads that no tap provides."""
        for t in self.active_terms:
            for side, names, have in (
                ("student", t.student_features, student),
                ("teacher", t.teacher_features, teacher),
            ):
                missing = [n for n in names if n not in have and n != "logits"]
                if missing:
                    raise ValueError(
                        f"objective term {t.name!r} reads {side} features {missing}, but the "
                        f"{side} taps provide {sorted(have) or 'none'}; add them under "
                        f"taps.{side} (a wildcard tap 'h' gives h.0, h.1, ...)"
                    )

    def counts(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Each active term's :attr:`Term.count` on ``batch``, as one float64 vector (in the
        order of :attr:`active_terms`)."""
        return torch.tensor([float(t.count(batch)) for t in self.active_terms], dtype=torch.float64)

    def setup(self, view: StudentView, signal: Signal | None) -> None:
        """Let terms create their trainable parts (projectors) from the shapes of a first batch."""
        for t in self.active_terms:
            setup = getattr(t.module, "setup", None)
            if setup is not None:
                setup(view, signal)

    def forward(
        self,
        view: StudentView,
        signal: Signal | None,
        batch: Mapping[str, Any],
        scales: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(Σ weight·value, {name: value})`` over the active terms; with ``scales`` (one
        factor per active term) each weighted value is multiplied by its factor in the total
        (the values returned stay unscaled)."""
        total: torch.Tensor | None = None
        values: dict[str, torch.Tensor] = {}
        for i, term in enumerate(self.active_terms):
            if term.needs_teacher and signal is None:
                raise ValueError(
                    f"objective term {term.name!r} needs a teacher signal, but no teacher was given"
                )
            value = term.fn(view, signal, batch)
            values[term.name] = value.detach()
            weighted = term.weight * value
            if scales is not None:
                weighted = weighted * float(scales[i])
            total = weighted if total is None else total + weighted
        assert total is not None
        return total, values
