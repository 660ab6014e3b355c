"""Reports: one page per recipe kind (:mod:`.classic`, :mod:`.embed`, :mod:`.causal_lm`,
:mod:`.chain`) built from a run's ``results.json``, chosen by its ``kind``; the model card of
every exported student (:mod:`.card`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import faults
from . import causal_lm, chain, classic, embed, text_classification


@dataclass(frozen=True)
class Page:
    """A kind's report: ``write(run_dir, results)`` writes report.md and report.html and
    returns their paths; ``console(run_dir, results)`` is what ``potstill distill`` prints."""

    write: Callable[[Path, dict[str, Any]], tuple[Path, Path]]
    console: Callable[[Path, dict[str, Any]], str]


PAGES: dict[str, Page] = {
    "classic": Page(classic.write, classic.console),
    "image-classification": Page(classic.write, classic.console),
    "embed": Page(embed.write, embed.console),
    "causal-lm": Page(causal_lm.write, causal_lm.console),
    "chain": Page(chain.write, chain.console),
    "text-classification": Page(text_classification.write, text_classification.console),
}
"""Recipe kind → its report page. A new kind adds its page file and an entry here."""


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """The results.json of a finished run; FileNotFoundError saying so otherwise."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a finished potstill run")
    return json.loads(path.read_text())


def page_for(results: dict[str, Any]) -> Page:
    """The page of the run's kind (classic for results written before kinds were recorded)."""
    kind = results.get("kind", "classic")
    if kind not in PAGES:
        raise ValueError(f"results.json: unknown kind {kind!r}; report pages: {', '.join(PAGES)}")
    return PAGES[kind]


def write_report(run_dir: str | Path, results: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write the report of the run in ``run_dir`` (from its results.json unless ``results`` are
    given); returns the paths of report.md and report.html."""
    run_dir = Path(run_dir)
    results = read_results(run_dir) if results is None else results
    faults.point("report")
    return page_for(results).write(run_dir, results)


def console_text(run_dir: str | Path, results: dict[str, Any]) -> str:
    """What ``potstill distill`` prints at the end of a run of this kind."""
    return page_for(results).console(Path(run_dir), results)
