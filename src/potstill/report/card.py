"""The model card of every exported student (``README.md`` in its folder), whatever the recipe
kind: what it was distilled from and into, on which data, with which objective and budget,
what it measured against its teacher, the recipe and the command that reproduces it; with the
Hugging Face card metadata the hub renders (base model, datasets, task, metrics as a
``model-index``), written by ``huggingface_hub``'s own ``ModelCardData``."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._version import __version__
from ..io import atomic_write_text
from .page import describe_term


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TAGS = ["potstill", "knowledge-distillation", "distillation"]


@dataclass
class CardMeta:
    """The card's hub metadata: the ``task`` (a hub pipeline tag: image-classification,
    text-classification, sentence-similarity, text-generation), the ``library`` that loads the
    folder (None: potstill's own), the models it came from (``base_models``: hub names; local
    folders are left out), the hub ``datasets``, the data's name, the task ``metrics`` on the
    test data and the ``recipe``."""

    task: str
    library: str | None = "transformers"
    base_models: Sequence[str] = ()
    datasets: Sequence[str] = ()
    data_name: str = "the run's test data"
    metrics: Mapping[str, float] = field(default_factory=dict)
    recipe: Mapping[str, Any] | None = None


def hub_ids(names: Sequence[str | None]) -> list[str]:
    """Those of ``names`` that are hub names (``org/name``, not a folder here), in order."""
    out: list[str] = []
    for n in names:
        if n and HUB_ID.match(str(n)) and not os.path.exists(str(n)) and n not in out:
            out.append(str(n))
    return out


def hub_datasets(*sources: Any) -> list[str]:
    """The hub dataset names of data sources (recipe sections with a ``hub`` field)."""
    return [str(s.hub) for s in sources if getattr(s, "hub", None)]


def front_matter(title: str, meta: CardMeta) -> str:
    """The YAML metadata block (between ``---`` lines) of a card, by ``huggingface_hub``."""
    from huggingface_hub import EvalResult, ModelCardData

    bases = hub_ids(list(meta.base_models))
    results = [
        EvalResult(
            task_type=meta.task,
            dataset_type=(list(meta.datasets) or ["custom"])[0],
            dataset_name=meta.data_name,
            metric_type=name,
            metric_name=name,
            metric_value=float(value),
        )  # fmt: skip
        for name, value in meta.metrics.items()
    ]
    data = ModelCardData(
        model_name=title, base_model=(bases[0] if len(bases) == 1 else bases) or None,
        datasets=list(meta.datasets) or None, library_name=meta.library,
        pipeline_tag=meta.task, tags=TAGS, eval_results=results or None,
    )  # fmt: skip
    return f"---\n{data.to_yaml()}\n---\n"


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
    meta: CardMeta | None = None,
) -> str:
    """The card's Markdown. ``teacher``/``student``/``data`` say what went in, in a few words;
    ``objective`` the recipe's terms; ``figures`` the student's measured results (listed, with
    nested values left out); ``summary`` a sentence of the headline result; ``meta`` the hub
    metadata (front matter) and the recipe (shown at the end)."""
    budget = f", {steps} optimizer steps" if steps is not None else ""
    lines = [
        *([front_matter(title, meta)] if meta is not None else []),
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
    if meta is not None and meta.recipe is not None:
        recipe = yaml.safe_dump(dict(meta.recipe), sort_keys=False, allow_unicode=True)
        lines += ["## The distillation recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, card: str) -> Path:
    """Write ``card`` as ``folder/README.md`` (atomically); returns its path."""
    return atomic_write_text(Path(folder) / "README.md", card)
