"""The model card of every exported student (``README.md`` in its folder), whatever the recipe
kind: what it was distilled from and into, on which data, with which objective and budget,
what it measured against its teacher, and the command that reproduces it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..io import atomic_write_text
from .page import describe_term


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card(
    *,
    title: str,
    teacher: str,
    student: str,
    data: str,
    steps: int | None,
    objective: Sequence[Mapping[str, Any]],
    figures: Mapping[str, Any],
    summary: str | None = None,
    command: str | None = None,
) -> str:
    """The card's Markdown. ``teacher``/``student``/``data`` say what went in, in a few words;
    ``objective`` the recipe's terms; ``figures`` the student's measured results (listed, with
    nested values left out); ``summary`` a sentence of the headline result."""
    budget = f", {steps} optimizer steps" if steps is not None else ""
    lines = [
        f"# {title}",
        "",
        f"Distilled by potstill {__version__} from {teacher} into {student} on {data}{budget}.",
        "",
    ]
    if summary:
        lines += [summary, ""]
    lines += [
        "Objective: " + (", ".join(describe_term(dict(o)) for o in objective) or "—") + ".",
        "",
    ]
    shown = {k: v for k, v in figures.items() if not isinstance(v, (dict, list, tuple))}
    if shown:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in shown.items()]
        lines.append("")
    if command:
        lines += [f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, card: str) -> Path:
    """Write ``card`` as ``folder/README.md`` (atomically); returns its path."""
    return atomic_write_text(Path(folder) / "README.md", card)
