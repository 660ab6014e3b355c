"""Runs: one small runner per recipe kind (:mod:`.classic`, :mod:`.embed`, :mod:`.causal_lm`,
:mod:`.chain`) on one run machinery (:class:`~potstill.runs.folder.RunFolder`), each building
its task, data, teacher source, student and objective, training through the
:class:`~potstill.Distiller`, and writing its rows; :func:`run` dispatches on the recipe's kind."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

from ..recipe import recipe_kind

RUNNERS: dict[str, str] = {
    "classic": "potstill.runs.classic",
    "image-classification": "potstill.runs.classic",
    "embed": "potstill.runs.embed",
    "causal-lm": "potstill.runs.causal_lm",
    "chain": "potstill.runs.chain",
    "text-classification": "potstill.runs.text_classification",
}
"""Recipe kind → the module whose ``run(recipe, run_dir, *, resume, overwrite)`` runs it. A new
kind is its runner file and an entry here (beside its schema in :data:`potstill.recipe.RECIPE_KINDS`
and its page in :data:`potstill.report.PAGES`)."""


def runner_for(recipe: Any) -> Callable[..., dict[str, Any]]:
    """The run function of the recipe's kind."""
    kind = recipe_kind(recipe)
    if kind not in RUNNERS:
        raise ValueError(f"no runner for recipe kind {kind!r}; runners: {', '.join(RUNNERS)}")
    return import_module(RUNNERS[kind]).run


def run(
    recipe: Any, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run ``recipe`` (any kind) in ``run_dir``; returns its results (also in results.json).
    An existing run folder continues only with ``resume``, or is emptied with ``overwrite``."""
    return runner_for(recipe)(recipe, run_dir, resume=resume, overwrite=overwrite)
