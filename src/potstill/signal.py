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


class StudentView:
    """What the student produced on one batch: logits with their graph, and named features.

    A view may instead hold the student's last ``hidden`` state and its output layer ``head``
    (an ``nn.Linear``, see :func:`potstill.llm.evaluate.causal_lm_hidden_forward`): then the
    logits are built from them on first access, and terms that can fuse the output layer with
    their loss (:func:`potstill.losses.causal.token_term`) read ``hidden`` and ``head`` without
    ever building the full logits (``deferred`` tells whether they are still unbuilt).
    """

    def __init__(
        self,
        logits: torch.Tensor | None = None,
        features: dict[str, torch.Tensor] | None = None,
        *,
        hidden: torch.Tensor | None = None,
        head: torch.nn.Module | None = None,
    ) -> None:
        if logits is None and (hidden is None or head is None):
            raise ValueError("a StudentView needs logits, or a hidden state and its head")
        self._logits = logits
        self.features = {} if features is None else features
        self.hidden = hidden
        self.head = head

    @property
    def logits(self) -> torch.Tensor:
        """The student's logits (built from ``hidden`` and ``head`` on first access)."""
        if self._logits is None:
            assert self.head is not None
            self._logits = self.head(self.hidden)
        return self._logits

    @property
    def deferred(self) -> bool:
        """True while the logits exist only as ``hidden`` and ``head``."""
        return self._logits is None

    def __repr__(self) -> str:
        shape = tuple(self.hidden.shape) if self.deferred else tuple(self.logits.shape)
        kind = "hidden" if self.deferred else "logits"
        return f"StudentView({kind}={shape}, features={sorted(self.features)})"
