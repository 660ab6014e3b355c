"""Causal-LM plumbing for token-level distillation: which positions are compared (next-token
shift, padding, prompt and ignore-index masks) and the shared part of two vocabularies."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .divergences import divergence
from .llm import chunked_divergence

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
    teacher_logits: Tensor,
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
    their shared part. ``chunk_size`` bounds memory (see ``chunked_divergence``)."""
    student_logits, teacher_logits = shared_vocabulary(student_logits, teacher_logits)
    teacher_logits = teacher_logits.detach()
    if chunk_size is None:
        return divergence(
            student_logits,
            teacher_logits,
            kind,
            temperature=temperature,
            beta=beta,
            skew=skew,
            mask=mask,
        )
    return chunked_divergence(
        student_logits,
        teacher_logits,
        kind,
        temperature=temperature,
        beta=beta,
        skew=skew,
        mask=mask,
        chunk_size=chunk_size,
    )
