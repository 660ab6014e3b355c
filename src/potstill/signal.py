"""The one currency between teachers and losses.

A teacher (live or cached) turns a batch into a :class:`Signal`; the student's forward pass gives a
:class:`StudentView`. Loss terms read from both, so every term works with every teacher source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .losses.llm import TopK


@dataclass
class Signal:
    """What a teacher says about one batch.

    ``logits`` holds dense logits of shape ``(..., V)``; ``topk`` the sparse form (the k most
    likely tokens' ids and log-probabilities and the tail mass, as a teacher cache stores them);
    a signal carries one or the other. ``features`` holds named intermediate outputs (filled by
    taps). Every tensor is detached: a signal never carries a graph.
    """

    logits: torch.Tensor | None = None
    topk: TopK | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StudentView:
    """What the student produced on one batch: logits with their graph, and named features."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
