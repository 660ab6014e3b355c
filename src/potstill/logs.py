"""Where a training run's rows go: ``metrics.jsonl`` (one JSON row per logged step or evaluation)
and, when the optional tensorboard package is installed, TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .io import CHECK_KEY, record_check


class MetricsLog:
    """Appends rows to ``run_dir/metrics.jsonl`` and TensorBoard (``run_dir/tensorboard``, with
    ``tensorboard``); a log without a ``run_dir`` (no folder, or a process other than rank 0)
    writes nothing. An evaluation row is ``{"eval": {"step": …, metrics…}}``."""

    def __init__(self, run_dir: Path | None, *, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.writer: Any = None
        if run_dir is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row``."""
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(metrics_line(row))
        if self.writer is not None:
            data = row.get("eval", row)
            prefix = "eval/" if "eval" in row else "train/"
            for k, v in data.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(prefix + k, v, data["step"])

    def close(self) -> None:
        """Flush and close TensorBoard's writer."""
        if self.writer is not None:
            self.writer.close()


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
