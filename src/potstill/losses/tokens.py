"""Causal-LM plumbing for token-level distillation: which positions are compared (next-token
shift, padding, prompt and ignore-index masks), the next-token loss, and token divergences."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..signal import StudentView, TopK
from .forms import view_divergence

log = logging.getLogger("potstill")


def next_token_mask(
    attention_mask: Tensor,
    *,
    labels: Tensor | None = None,
    prompt_lengths: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Which logits positions take part in a causal-LM loss, shape ``(B, T)`` bool.

    Position ``t`` predicts token ``t + 1``, so it counts when token ``t + 1`` is real (attention
    mask 1), is not part of the prompt (index ``≥ prompt_lengths[b]``, when given) and its label is
    not ``ignore_index`` (when ``labels`` are given, aligned with the input ids). The last
    position predicts nothing and never counts. Works with left and right padding.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    target_ok = attention_mask[:, 1:].bool()
    if labels is not None:
        if labels.shape != attention_mask.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal attention_mask shape "
                f"{tuple(attention_mask.shape)}"
            )
        target_ok = target_ok & (labels[:, 1:] != ignore_index)
    if prompt_lengths is not None:
        positions = torch.arange(1, attention_mask.shape[1], device=attention_mask.device)
        target_ok = target_ok & (positions.unsqueeze(0) >= prompt_lengths.unsqueeze(1))
    last = torch.zeros_like(target_ok[:, :1])
    return torch.cat([target_ok, last], dim=1)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor | TopK,
    mask: Tensor,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """A divergence between student and teacher next-token distributions, averaged over the
    positions where ``mask`` (from :func:`next_token_mask`) is true; the vocabularies are cut to
    their shared part. ``chunk_size`` bounds memory (see ``chunked_divergence``). The teacher
    may be dense logits or a :class:`~potstill.signal.TopK` (a teacher cache's form: then
    ``sparse_divergence`` on k+1 buckets). The form is chosen by
    :func:`~potstill.losses.forms.view_divergence`."""
    return view_divergence(
        StudentView(logits=student_logits), teacher_logits, kind, temperature=temperature,
        beta=beta, skew=skew, mask=mask, chunk_size=chunk_size, shared_vocab=True,
    )  # fmt: skip


def batch_token_mask(batch: Mapping[str, Any], ignore_index: int = -100) -> Tensor:
    """:func:`next_token_mask` of a causal-LM batch: its ``attention_mask``, and its
    ``prompt_length`` and ``labels`` when present."""
    return next_token_mask(
        batch["attention_mask"],
        labels=batch.get("labels"),
        prompt_lengths=batch.get("prompt_length"),
        ignore_index=ignore_index,
    )


def next_token_nll(logits: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum, count)`` of the next-token negative log-likelihood of ``input_ids`` under
    ``logits`` ``(B, T, V)`` over the positions where ``mask`` (from :func:`next_token_mask`)
    is true. Position ``t`` is scored on token ``t + 1``."""
    if logits.shape[:2] != input_ids.shape or mask.shape != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)} and mask "
            f"{tuple(mask.shape)} must agree on (B, T)"
        )
    targets = torch.where(mask[:, :-1], input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return total, mask[:, :-1].sum()


def token_count(batch: Mapping[str, Any]) -> Tensor:
    """The number of positions a token term averages over in ``batch``."""
    return batch_token_mask(batch).sum()
