"""Attention distillation: TinyBERT attention matching, MiniLMv2 relations, attention transfer.

Pure tensor functions; half-precision inputs are computed in float32, float64 stays in float64.
The teacher is never detached here: callers pass detached teacher tensors if they want no
gradient there. Masks are bool ``(B, T)`` tensors, true at real (non-padding) tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .divergences import compute_dtype

__all__ = ["attention_kl", "attention_mse", "attention_transfer", "minilm_relation_loss"]


def _check_mask(mask: Tensor, batch: int, length: int, what: str) -> None:
    if mask.shape != (batch, length):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must be (B, T) = {(batch, length)} for {what}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}; use mask.bool()")


def _check_attention(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None) -> None:
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(
            "student and teacher attention must have the same shape (B, H, T, T), got "
            f"student {tuple(student_attn.shape)} and teacher {tuple(teacher_attn.shape)}; "
            "TinyBERT-style attention matching needs equal head counts and lengths. For "
            "different head counts use minilm_relation_loss (MiniLMv2 relations)"
        )
    if student_attn.dim() != 4 or student_attn.shape[-1] != student_attn.shape[-2]:
        raise ValueError(f"attention must have shape (B, H, T, T), got {tuple(student_attn.shape)}")
    if mask is not None:
        batch, _, length, _ = student_attn.shape
        _check_mask(mask, batch, length, f"attention of shape {tuple(student_attn.shape)}")


def attention_mse(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None) -> Tensor:
    """TinyBERT attention loss: mean squared error between attention probabilities.

    Inputs are attention probabilities of shape ``(B, H, T, T)`` (query, key last), with the
    same shape for student and teacher. An entry ``(b, h, i, j)`` is valid when ``mask[b, i]``
    and ``mask[b, j]`` are both true (every entry when ``mask`` is None). The loss is::

        Σ_valid (S[b,h,i,j] − T[b,h,i,j])²  /  #valid

    with ``#valid = H · Σ_b n_b²`` (``n_b`` the number of real tokens of sample ``b``). A mask
    with no true entry gives exactly 0 (not NaN) with the graph attached.
    """
    _check_attention(student_attn, teacher_attn, mask)
    dtype = compute_dtype(student_attn, teacher_attn)
    sq = (student_attn.to(dtype) - teacher_attn.to(dtype)).square()
    if mask is None:
        return sq.mean() if sq.numel() else sq.sum()
    valid = mask[:, None, :, None] & mask[:, None, None, :]  # (B, 1, T, T)
    total = torch.where(valid, sq, torch.zeros_like(sq)).sum()
    count = valid.sum() * student_attn.shape[1]
    return total / count.clamp_min(1)


def attention_kl(
    student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None, eps: float = 1e-12
) -> Tensor:
    """KL(teacher row ‖ student row) between attention probabilities, mean over query rows.

    Inputs are attention probabilities ``(B, H, T, T)`` of the same shape. Per row
    ``(b, h, i)``::

        KL_bhi = Σ_j T[b,h,i,j] · (log max(T[b,h,i,j], eps) − log max(S[b,h,i,j], eps))

    summed over all key positions ``j`` (padding keys are not excluded or renormalized: in real
    models they already carry ~0 probability), then averaged over the rows whose query is real
    (``mask[b, i]`` true; every row when ``mask`` is None). An empty mask gives exactly 0.
    """
    _check_attention(student_attn, teacher_attn, mask)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    dtype = compute_dtype(student_attn, teacher_attn)
    s = student_attn.to(dtype)
    t = teacher_attn.to(dtype)
    per_row = (t * (t.clamp_min(eps).log() - s.clamp_min(eps).log())).sum(dim=-1)  # (B, H, T)
    if mask is None:
        return per_row.mean() if per_row.numel() else per_row.sum()
    valid = mask[:, None, :].expand_as(per_row)
    total = torch.where(valid, per_row, torch.zeros_like(per_row)).sum()
    return total / valid.sum().clamp_min(1)


def _relation_log_probs(
    x: Tensor, num_heads: int, mask: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """Log of MiniLMv2's relation ``softmax(X_r X_rᵀ / sqrt(D/R))``, shape ``(B, R, T, T)``."""
    batch, length, hidden = x.shape
    head_dim = hidden // num_heads
    heads = x.to(dtype).reshape(batch, length, num_heads, head_dim).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(head_dim)
    if mask is not None:
        # The lowest finite value instead of -inf: a sample with no real token then gives a
        # uniform (finite) row instead of NaN; it is excluded from the mean anyway.
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(dtype).min)
    return F.log_softmax(scores, dim=-1)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) per row, summed over the last dim; entries where p == 0 contribute 0."""
    lowest = torch.finfo(log_p.dtype).min
    return F.kl_div(
        log_q.clamp_min(lowest), log_p.clamp_min(lowest), reduction="none", log_target=True
    ).sum(dim=-1)


def _check_qkv(name: str, qkv: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(qkv, Tensor) or len(qkv) != 3:
        raise ValueError(f"{name} must be a (q, k, v) tuple of three (B, T, D) tensors")
    for label, x in zip("qkv", qkv, strict=True):
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} {label} must be a (B, T, D) tensor, got {shape}")
    return qkv[0], qkv[1], qkv[2]


def minilm_relation_loss(
    student_qkv: Sequence[Tensor],
    teacher_qkv: Sequence[Tensor],
    *,
    num_relation_heads: int,
    mask: Tensor | None = None,
) -> Tensor:
    """MiniLMv2 (Wang et al., 2021) self-attention relation distillation.

    ``student_qkv`` and ``teacher_qkv`` are ``(q, k, v)`` tuples of ``(B, T, D)`` tensors
    (queries, keys and values of one layer with the heads concatenated). ``B`` and ``T`` must
    agree everywhere; ``D`` may differ between student and teacher (and between q, k and v),
    but each ``D`` must be divisible by ``num_relation_heads`` (``R``).

    For ``X`` in q, k, v, the hidden dim is split into ``R`` relation heads
    ``X_r`` of shape ``(B, R, T, D/R)`` and the relation is
    ``softmax(X_r X_rᵀ / sqrt(D/R))`` over keys, with keys where ``mask`` is false excluded
    (given zero probability). ``loss_X`` is KL(teacher relation ‖ student relation) summed over
    keys and averaged over the valid ``(b, r, query)`` rows (query real; all rows when ``mask``
    is None). The result is the unweighted sum ``loss_q + loss_k + loss_v`` of the Q-Q, K-K and
    V-V relation losses. Since relations are ``T × T``, the student and teacher head counts and
    widths need not match. An empty mask gives exactly 0.
    """
    s_q, s_k, s_v = _check_qkv("student_qkv", student_qkv)
    t_q, t_k, t_v = _check_qkv("teacher_qkv", teacher_qkv)
    if isinstance(num_relation_heads, bool) or not isinstance(num_relation_heads, int):
        raise ValueError(f"num_relation_heads must be a positive int, got {num_relation_heads!r}")
    if num_relation_heads < 1:
        raise ValueError(f"num_relation_heads must be positive, got {num_relation_heads}")
    batch, length = s_q.shape[:2]
    named = {
        "student q": s_q,
        "student k": s_k,
        "student v": s_v,
        "teacher q": t_q,
        "teacher k": t_k,
        "teacher v": t_v,
    }
    for name, x in named.items():
        if x.shape[:2] != (batch, length):
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, but all of q, k, v must share (B, T) = "
                f"{(batch, length)} (from student q)"
            )
        if x.shape[2] % num_relation_heads:
            raise ValueError(
                f"{name} hidden size {x.shape[2]} (shape {tuple(x.shape)}) is not divisible by "
                f"num_relation_heads={num_relation_heads}"
            )
    if mask is not None:
        _check_mask(mask, batch, length, f"q/k/v of shape (B, T) = {(batch, length)}")

    dtype = compute_dtype(*named.values())
    total = s_q.new_zeros((), dtype=dtype)
    for s_x, t_x in ((s_q, t_q), (s_k, t_k), (s_v, t_v)):
        log_s = _relation_log_probs(s_x, num_relation_heads, mask, dtype)
        log_t = _relation_log_probs(t_x, num_relation_heads, mask, dtype)
        per_row = _kl_rows(log_t, log_s)  # (B, R, T)
        if mask is None:
            total = total + (per_row.mean() if per_row.numel() else per_row.sum())
        else:
            valid = mask[:, None, :].expand_as(per_row)
            rows = torch.where(valid, per_row, torch.zeros_like(per_row)).sum()
            total = total + rows / valid.sum().clamp_min(1)
    return total


def _attention_map(fmap: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """``mean_c |x|^p`` of a ``(B, C, H, W)`` map, shape ``(B, 1, H, W)``."""
    x = fmap.to(dtype)
    powered = x.square() if p == 2 else x.abs().pow(p)
    return powered.mean(dim=1, keepdim=True)


def attention_transfer(student_fmap: Tensor, teacher_fmap: Tensor, *, p: float = 2) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, 2017), as in their official code.

    For a feature map ``x`` of shape ``(B, C, H, W)``, ``at(x)`` is the mean over channels of
    ``|x|^p``, flattened to ``(B, H·W)`` and L2-normalized over the spatial positions
    (``eps = 1e-12``). The loss is the mean over batch and positions of
    ``(at(student) − at(teacher))²``. Channel counts may differ. When the spatial sizes differ,
    the student's ``(B, 1, H, W)`` attention map is resized bilinearly (``align_corners=False``)
    to the teacher's size before flattening and normalizing. Invariant to positive scaling of
    either map. For ``p < 1`` the gradient is unbounded at exact zeros.
    """
    if student_fmap.dim() != 4 or teacher_fmap.dim() != 4:
        raise ValueError(
            "attention transfer needs 4-D feature maps (B, C, H, W), got "
            f"student {tuple(student_fmap.shape)} and teacher {tuple(teacher_fmap.shape)}"
        )
    if student_fmap.shape[0] != teacher_fmap.shape[0]:
        raise ValueError(
            "student and teacher feature maps must have the same batch size, got "
            f"student {tuple(student_fmap.shape)} and teacher {tuple(teacher_fmap.shape)}"
        )
    if not p > 0:
        raise ValueError(f"p must be positive, got {p}")
    dtype = compute_dtype(student_fmap, teacher_fmap)
    s_map = _attention_map(student_fmap, p, dtype)
    t_map = _attention_map(teacher_fmap, p, dtype)
    if s_map.shape[-2:] != t_map.shape[-2:]:
        s_map = F.interpolate(s_map, size=t_map.shape[-2:], mode="bilinear", align_corners=False)
    batch = s_map.shape[0]
    s_at = F.normalize(s_map.reshape(batch, -1), dim=1, eps=1e-12)
    t_at = F.normalize(t_map.reshape(batch, -1), dim=1, eps=1e-12)
    sq = (s_at - t_at).square()
    return sq.mean() if sq.numel() else sq.sum()
