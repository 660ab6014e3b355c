"""Causal-LM plumbing for token-level distillation: which positions are compared (next-token
shift, padding, prompt and ignore-index masks) and the shared part of two vocabularies."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..signal import Signal, StudentView, TopK
from .chunked import chunked_divergence
from .divergences import divergence
from .fused import fused_linear_divergence
from .objective import Term, teacher_target
from .sparse import sparse_divergence

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


def shared_vocabulary(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both logits cut to their common vocabulary size, for models whose output matrices differ
    only by padding rows (checked beforehand with ``potstill.hf.shared_vocab_size``)."""
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if v_s == v_t:
        return student_logits, teacher_logits
    v = min(v_s, v_t)
    return student_logits[..., :v], teacher_logits[..., :v]


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
    ``sparse_divergence`` on k+1 buckets)."""
    opts: dict[str, Any] = {"temperature": temperature, "beta": beta, "skew": skew, "mask": mask}
    if isinstance(teacher_logits, TopK):
        topk = teacher_logits
        return sparse_divergence(student_logits, topk, kind, chunk_size=chunk_size, **opts)
    student_logits, teacher_logits = shared_vocabulary(student_logits, teacher_logits)
    teacher_logits = teacher_logits.detach()
    if chunk_size is None:
        return divergence(student_logits, teacher_logits, kind, **opts)
    return chunked_divergence(student_logits, teacher_logits, kind, chunk_size=chunk_size, **opts)


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


def _token_count(batch: Mapping[str, Any]) -> Tensor:
    return batch_token_mask(batch).sum()


def next_token_ce_term(weight: float = 1.0, name: str = "ce") -> Term:
    """Cross-entropy on the data's next tokens (the usual LM fine-tuning loss), averaged over the
    positions of :func:`batch_token_mask`; 0 when a batch has none. Needs no teacher."""

    def fn(view: StudentView, signal: Signal | None, batch: Mapping[str, Any]) -> Tensor:
        total, count = next_token_nll(view.logits, batch["input_ids"], batch_token_mask(batch))
        return total / count.clamp_min(1)

    return Term(name, fn, weight, needs_teacher=False, count=_token_count)


def token_term(
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    weight: float = 1.0,
    chunk_size: int | None = None,
    name: str | None = None,
) -> Term:
    """A token-level divergence between the student's and the teacher's next-token
    distributions (:func:`token_divergence`) on the positions of :func:`batch_token_mask`; the
    teacher's signal may be dense (a live teacher) or top-k (a teacher cache). With a view whose
    logits are deferred (a hidden state and the LM head) and a dense teacher, the head is fused
    with the divergence (:func:`~potstill.losses.fused.fused_linear_divergence`): the student's
    full logits and their gradient are never built; the value and gradients are the same."""

    def fn(view: StudentView, signal: Signal | None, batch: Mapping[str, Any]) -> Tensor:
        target = teacher_target(signal, name or kind)
        if view.deferred and not isinstance(target, TopK):
            # the student's output layer fused with the divergence: logits one chunk at a time
            assert view.head is not None and view.hidden is not None
            weight, bias = view.head.weight, view.head.bias
            v = min(weight.shape[0], target.shape[-1])  # the shared vocabulary
            if v < weight.shape[0]:  # (a slice's gradient is a full-size copy: only if needed)
                weight, bias = weight[:v], None if bias is None else bias[:v]
            return fused_linear_divergence(
                view.hidden,
                weight,
                target[..., :v],
                kind,
                bias=bias,
                temperature=temperature,
                beta=beta,
                skew=skew,
                mask=batch_token_mask(batch),
                chunk_size=chunk_size,
            )
        return token_divergence(
            view.logits,
            target,
            batch_token_mask(batch),
            kind,
            temperature=temperature,
            beta=beta,
            skew=skew,
            chunk_size=chunk_size,
        )

    return Term(name or kind, fn, weight, count=_token_count)
