"""Where a training run's rows go: ``metrics.jsonl`` (one JSON row per logged step or evaluation)
and, when the optional tensorboard package is installed, TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
                f.write(json.dumps(row) + "\n")
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
