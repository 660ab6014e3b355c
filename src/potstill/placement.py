"""Where a run's models and batches live: a :class:`Placement` puts the student, the teacher and
every batch on its device. The CPU is the only placement that recipes use today; GPUs (one
device per process, precision and memory per device) come in through this seam."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Placement:
    """Teacher, student and batches on ``device`` (default: the CPU)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def model(self, model: M) -> M:
        """``model`` on this placement's device (moved in place; returned for chaining)."""
        return model.to(self.device)

    def batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch with every tensor on this placement's device (others as they are)."""
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }


CPU = Placement()
"""The placement of every run today."""
