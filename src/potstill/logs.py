"""Where a training run's rows go: ``metrics.jsonl`` (one JSON row per logged step or evaluation)
and the experiment trackers of ``train.report_to`` (:mod:`potstill.trackers`: TensorBoard,
Weights & Biases, MLflow)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import CHECK_KEY, record_check
from .trackers import Trackers, not_set_up, resolve_report_to, run_identity

log = logging.getLogger("potstill")


class MetricsLog:
    """Appends rows to ``run_dir/metrics.jsonl`` and reports them to the trackers ``report_to``
    names (:func:`potstill.trackers.resolve_report_to`; ``name`` the tracker run's name,
    ``config`` its configuration); a log without a ``run_dir`` (no folder, or a process other
    than rank 0) writes nothing. An evaluation row is ``{"eval": {"step": …, metrics…}}``."""

    def __init__(
        self,
        run_dir: Path | None,
        *,
        report_to: str | Sequence[str] | None = None,
        tensorboard: bool = True,
        name: str = "student",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.trackers: Trackers | None = None
        if run_dir is not None:
            names = resolve_report_to(report_to, tensorboard=tensorboard)
            auto = report_to in (None, "auto")
            if names or auto:
                log.info("%s: reporting to %s (train.report_to: %s)%s", name,
                         ", ".join(["metrics.jsonl", *names]),
                         "auto: the trackers installed and set up" if auto else report_to,
                         not_set_up() if auto else "")  # fmt: skip
            if names:
                title, settings = run_identity(run_dir, name, config or {})
                self.trackers = Trackers(run_dir, names, name=title, config=settings)

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row``."""
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(metrics_line(row))
        if self.trackers is not None:
            self.trackers.write(row)

    def close(self) -> None:
        """Flush and close the trackers."""
        if self.trackers is not None:
            self.trackers.close()


def metrics_line(row: dict[str, Any]) -> str:
    """One line of ``metrics.jsonl``: the row and its ``check`` (see ``io.record_check``)."""
    return json.dumps({**row, CHECK_KEY: record_check(row)}) + "\n"


def metrics_text(history: list[dict[str, Any]], evals: list[dict[str, Any]]) -> str:
    """``metrics.jsonl`` as a run that logged ``history`` (training rows) and ``evals``
    (evaluation rows) wrote it: by step, a step's training row before its evaluation."""
    rows = [(r["step"], 0, r) for r in history] + [(e["step"], 1, {"eval": e}) for e in evals]
    return "".join(metrics_line(r) for _, _, r in sorted(rows, key=lambda x: x[:2]))


def read_metrics_lines(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a ``metrics.jsonl`` (``check`` removed) and what is wrong with its damaged
    lines, each named ``path:line`` (a line that does not parse or whose ``check`` differs;
    rows written before checks existed are taken as they are)."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            problems.append(f"{path}:{n} is damaged ({e})")
            continue
        check = row.pop(CHECK_KEY, None)
        if check is not None and check != record_check(row):
            problems.append(f"{path}:{n} is damaged (its check differs)")
            continue
        rows.append(row)
    return rows, problems
