"""Multi-stage distillation: teacher assistants between a large teacher and a small student
(Mirzadeh et al. 2020), planned geometrically; an ensemble of models as one teacher; and a
chain of ordinary runs in which each student teaches the next (born-again generations when the
architecture repeats, Furlanello et al. 2018)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

from torch import nn

from .models import ArchSpec


def geometric_steps(large: float, small: float, count: int) -> list[float]:
    """``count`` values strictly between ``large`` and ``small`` in equal ratios (the geometric
    interpolation), largest first."""
    if not (large > small > 0):
        raise ValueError(f"need large > small > 0, got {large} and {small}")
    if count < 0:
        raise ValueError(f"count must be ≥ 0, got {count}")
    ratio = small / large
    return [large * ratio ** ((i + 1) / (count + 1)) for i in range(count)]


def plan_layers(teacher_layers: int, student_layers: int, assistants: int = 1) -> list[int]:
    """Layer counts of ``assistants`` teacher assistants between a ``teacher_layers``-layer
    teacher and a ``student_layers``-layer student (geometric, rounded, strictly decreasing and
    strictly between both): 30 → 8 with one assistant gives [15]. ValueError when there is no
    room for that many."""
    if assistants > teacher_layers - student_layers - 1:
        raise ValueError(
            f"no room for {assistants} assistants between {teacher_layers} and {student_layers} "
            "layers; plan fewer"
        )
    plan: list[int] = []
    for value in geometric_steps(teacher_layers, student_layers, assistants):
        n = round(value)
        upper = plan[-1] - 1 if plan else teacher_layers - 1
        lower = student_layers + (assistants - len(plan))  # room left for the later ones
        plan.append(min(upper, max(lower, n)))
    return plan


def plan_arch(teacher: ArchSpec, student: ArchSpec, assistants: int = 1) -> list[ArchSpec]:
    """Built-in architectures (``mlp``/``cnn``) between ``teacher`` and ``student``: depth (hidden
    layers, conv stages) and widths interpolated geometrically, largest first; the rest (dropout)
    as the student's. Both must be of the same kind and task (input shape, classes)."""
    if teacher.kind != student.kind:
        raise ValueError(f"teacher is a {teacher.kind}, student a {student.kind}: plan one kind")
    if teacher.input_shape != student.input_shape or teacher.num_classes != student.num_classes:
        raise ValueError("teacher and student must share input_shape and num_classes")

    def between(a: list[int], b: list[int]) -> list[list[int]]:
        if not a or not b:
            return [list(b)] * assistants
        depths = [max(1, round(x)) for x in _steps_or_equal(len(a), len(b), assistants)]
        widths = _steps_or_equal(_geo_mean(a), _geo_mean(b), assistants)
        return [[max(1, round(w))] * d for d, w in zip(depths, widths, strict=True)]

    hidden = between(teacher.hidden, student.hidden)
    channels = between(teacher.channels, student.channels) if teacher.kind == "cnn" else None
    # an assistant is trained like the student (its dropout and the rest), only larger
    return [
        student.model_copy(
            update={"hidden": hidden[i], "channels": channels[i] if channels else []}
        )
        for i in range(assistants)
    ]


def _geo_mean(widths: list[int]) -> float:
    return math.exp(sum(math.log(w) for w in widths) / len(widths))


def _steps_or_equal(large: float, small: float, count: int) -> list[float]:
    if large == small:
        return [large] * count
    if large < small:
        return list(reversed(geometric_steps(small, large, count)))
    return geometric_steps(large, small, count)


def distill_chain(
    teacher: nn.Module,
    students: Sequence[nn.Module],
    distill_one: Callable[[nn.Module, nn.Module, int], nn.Module],
) -> list[nn.Module]:
    """Distill along a chain: ``students[0]`` learns from ``teacher``, each later one from the
    trained previous student. ``distill_one(teacher, student, stage)`` trains one stage and
    returns the trained student (e.g. a ``potstill.distill`` call). Returns the trained students
    in order; the given modules are not changed (each stage trains a copy)."""
    trained: list[nn.Module] = []
    current = teacher
    for stage, student in enumerate(students):
        current = distill_one(current, copy.deepcopy(student), stage)
        trained.append(current)
    return trained


__all__ = [
    "distill_chain",
    "geometric_steps",
    "plan_arch",
    "plan_layers",
]
