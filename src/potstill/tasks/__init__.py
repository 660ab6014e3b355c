"""Tasks: what a batch holds, the model's forward, the task's metrics and how its student is
exported. One file per task (:mod:`.classifier`, :mod:`.embedding`, :mod:`.causal_lm`), each
defining a :class:`Task`; runners find theirs in :data:`TASKS` (see :func:`get_task`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from ..teachers import ForwardFn


@dataclass(frozen=True)
class Task:
    """What a run needs to know about its task.

    ``tokens``: the objective's terms compare next-token distributions (``ce`` is the
    next-token loss). ``student_forward`` / ``teacher_forward``: the model's output on a batch
    (logits, or a :class:`~potstill.signal.StudentView`). ``metrics(models, data, *, teacher,
    **options)``: one row of figures per named model. ``export(model, folder, **options)``: the
    trained student as a plain folder with nothing of potstill inside; returns the folder.
    """

    name: str
    tokens: bool
    student_forward: ForwardFn
    teacher_forward: ForwardFn
    metrics: Callable[..., dict[str, dict[str, Any]]]
    export: Callable[..., Path]


TASKS: dict[str, str] = {
    "classifier": "potstill.tasks.classifier",
    "text-classifier": "potstill.tasks.text_classifier",
    "embedding": "potstill.tasks.embedding",
    "causal-lm": "potstill.tasks.causal_lm",
}
"""Task name → the module that defines its ``TASK``. A new task is one file and one entry."""


def get_task(name: str) -> Task:
    """The task called ``name``; ValueError listing the tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return import_module(TASKS[name]).TASK
