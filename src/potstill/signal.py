"""The one currency between teachers and losses.

A teacher (live or cached) turns a batch into a :class:`Signal`, dense (logits) or sparse
(:class:`TopK`: the k most likely tokens and the tail mass); the student's forward pass gives a
:class:`StudentView`. Loss terms read from both, so every term works with every teacher source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TopK:
    """A sparse summary of a teacher's next-token distribution at each position.

    ``ids`` ``(..., k)`` are the teacher's top-k token ids, ``logprobs`` ``(..., k)`` their
    log-probabilities under the stored distribution (normally temperature 1), and
    ``tail_mass`` ``(...)`` the probability left to all other tokens, ``1 − Σ exp(logprobs)``
    clamped at 0. This is what one stores to distil from precomputed teacher outputs without
    keeping ``V`` floats per token.
    """

    ids: Tensor
    logprobs: Tensor
    tail_mass: Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape or self.ids.dim() < 1:
            raise ValueError(
                f"ids and logprobs must share a shape (..., k), got ids {tuple(self.ids.shape)} "
                f"and logprobs {tuple(self.logprobs.shape)}"
            )
        if self.tail_mass.shape != self.ids.shape[:-1]:
            raise ValueError(
                f"tail_mass shape {tuple(self.tail_mass.shape)} must equal the leading dims "
                f"{tuple(self.ids.shape[:-1])} of ids"
            )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TopK:
        """The same summary on ``device`` (itself when it is there already)."""
        return TopK(
            self.ids.to(device, non_blocking=non_blocking),
            self.logprobs.to(device, non_blocking=non_blocking),
            self.tail_mass.to(device, non_blocking=non_blocking),
        )

    @property
    def k(self) -> int:
        """Number of stored tokens per position."""
        return self.ids.shape[-1]

    @classmethod
    def from_logits(cls, teacher_logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
        """Top-k summary of ``softmax(teacher_logits / temperature)``, detached.

        ``temperature`` is the one the stored distribution is taken at (1 for the teacher's own
        distribution); :func:`sparse_divergence` re-tempers the stored buckets on top of it.
        Log-probabilities are kept in at least float32.
        """
        vocab = teacher_logits.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"k must lie in [1, V={vocab}], got {k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        logits = teacher_logits.detach().to(
            torch.promote_types(teacher_logits.dtype, torch.float32)
        )
        logprobs, ids = F.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
        tail_mass = (1.0 - logprobs.exp().sum(dim=-1)).clamp_min(0.0)
        if k == vocab:
            # nothing is left outside the top-k; 1 − Σ would only keep rounding error, which
            # against the student's exactly-empty tail gives a huge spurious KL term
            tail_mass = torch.zeros_like(tail_mass)
        return cls(ids=ids, logprobs=logprobs, tail_mass=tail_mass)


def place_rows(items: Sequence[Mapping[str, Tensor]], mask: Tensor) -> dict[str, Tensor]:
    """Per-example rows (one per real token: ``ids``, ``logprobs`` ``(n, k)``, ``tail`` and
    features ``(n, ...)``) placed at the real positions of ``mask`` ``(B, T)``; padding
    positions hold a uniform top-k (ids 0..k−1) or zeros, which token masks leave out. Each
    example's row count must equal its number of real tokens."""
    B, T = mask.shape
    out: dict[str, Tensor] = {}
    for name, first in items[0].items():
        if name == "ids":
            fill = torch.arange(first.shape[-1]).expand(B, T, -1).clone()
        elif name == "logprobs":
            fill = torch.full((B, T, first.shape[-1]), -math.log(first.shape[-1]))
        else:
            fill = torch.zeros((B, T, *first.shape[1:]), dtype=first.dtype)
        out[name] = fill
    for b, item in enumerate(items):
        for name, t in item.items():
            out[name][b][mask[b]] = t.to(out[name].dtype)
    return out


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

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Signal:
        """The same signal with every tensor on ``device`` (no copy of those already there)."""
        return Signal(
            logits=None
            if self.logits is None
            else self.logits.to(device, non_blocking=non_blocking),
            topk=None if self.topk is None else self.topk.to(device, non_blocking=non_blocking),
            features={k: v.to(device, non_blocking=non_blocking) for k, v in self.features.items()},
        )


class StudentView:
    """What the student produced on one batch: logits with their graph, and named features.

    A view may instead hold the student's last ``hidden`` state and its output layer ``head``
    (an ``nn.Linear``, see :func:`potstill.llm.forward.causal_lm_hidden_forward`): then the
    logits are built from them on first access, and terms that can fuse the output layer with
    their loss (:func:`potstill.losses.terms.token_term`) read ``hidden`` and ``head`` without
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
