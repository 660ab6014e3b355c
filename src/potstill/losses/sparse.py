"""Divergences against a sparse (top-k) teacher: both distributions collapsed onto the
teacher's k tokens and one tail bucket, at once or chunk by chunk (the engine of :mod:`.chunked`,
the gradient carried from the k+1 buckets to the V logits in closed form)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..signal import TopK
from .chunked import chunked_loss, validate
from .divergences import check_mask, compute_dtype, divergence_fn

__all__ = ["sparse_divergence"]


def _student_buckets(student_logits: Tensor, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """Student log-probabilities (T = 1) on the k+1 buckets: the ``ids`` and the rest."""
    log_p = F.log_softmax(student_logits.to(dtype), dim=-1)
    top = log_p.gather(-1, ids)
    # The tail is the logsumexp over the tokens *outside* ids, not log(1 − Σ top): no
    # cancellation when the top-k hold almost all the mass. The ids are overwritten with the
    # lowest finite value (exp gives exactly 0) rather than -inf, so that k = V gives a finite
    # tail whose gradient is 0 instead of NaN.
    rest = log_p.scatter(-1, ids, torch.finfo(dtype).min)
    tail = torch.logsumexp(rest, dim=-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


def _teacher_buckets(logprobs: Tensor, tail_mass: Tensor, dtype: torch.dtype, full: bool) -> Tensor:
    """Teacher log-probabilities on the k+1 buckets; a zero tail becomes the lowest float.

    ``full``: k = V, so the tail bucket is empty for the student too and any stored tail is
    rounding error (see :meth:`TopK.from_logits`); dropping it keeps k = V equal to the dense
    divergence.
    """
    lowest = torch.finfo(dtype).min
    tail_mass = torch.zeros_like(tail_mass, dtype=dtype) if full else tail_mass.to(dtype)
    tail = tail_mass.log().clamp_min(lowest).unsqueeze(-1)
    return torch.cat([logprobs.to(dtype), tail], dim=-1)


def _temper(log_buckets: Tensor, temperature: float) -> Tensor:
    """``log_softmax(log_buckets / T)``, finite: ``lowest / T`` would overflow to -inf for T < 1
    and -inf gives NaN gradients in the mixture kinds."""
    scaled = (log_buckets / temperature).clamp_min(torch.finfo(log_buckets.dtype).min)
    return F.log_softmax(scaled, dim=-1)


def _sparse_per_position(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail_mass: Tensor,
    *,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
) -> Tensor:
    """Per-position sparse divergence ``(...)`` on the k+1 buckets, in the compute dtype."""
    dtype = compute_dtype(student_logits, logprobs, tail_mass)
    full = ids.shape[-1] == student_logits.shape[-1]
    student = _student_buckets(student_logits, ids, dtype)
    opts = {"kind": kind, "temperature": temperature, "beta": beta, "skew": skew}
    return _bucket_divergence(student, logprobs, tail_mass, full, **opts)


def _bucket_divergence(
    student_buckets: Tensor,
    logprobs: Tensor,
    tail_mass: Tensor,
    full: bool,
    *,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
) -> Tensor:
    """The divergence ``kind`` between the student's k+1 bucket log-probabilities (T = 1, last
    bucket the tail) and the teacher's stored top-k and tail (``full``: k = V, see
    :func:`_teacher_buckets`), both tempered, per position."""
    dtype = student_buckets.dtype
    teacher = _temper(_teacher_buckets(logprobs, tail_mass, dtype, full), temperature)
    student = _temper(student_buckets, temperature)
    return divergence_fn(kind)(student, teacher, beta=beta, skew=skew)


def _sparse_chunk(
    student: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail_mass: Tensor,
    grad_out: Tensor | None,
    grad_scale: float | Tensor,
    *,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
) -> Tensor:
    """Per-position sparse values on rows, in the compute dtype; if ``grad_out`` is given,
    ``grad_scale`` times the gradient of their sum w.r.t. the student logits is written into it.

    The gradient goes through the k+1 student buckets: with ``g = ∂D/∂s`` over the bucket
    log-probabilities ``s`` (by autograd over the small ``(n, k+1)`` tensor) and ``G = Σ g``, a
    token j among the ids gets ``g_j − p_j·G`` and any other token ``p_j·(g_tail/S_tail − G)``
    (``S_tail`` the student's mass outside the ids), computed in one ``(n, V)`` buffer.
    """
    opts = {"kind": kind, "temperature": temperature, "beta": beta, "skew": skew}
    if grad_out is None:
        return _sparse_per_position(student, ids, logprobs, tail_mass, **opts)
    dtype = compute_dtype(student, logprobs, tail_mass)
    full = ids.shape[-1] == student.shape[-1]
    buf = F.log_softmax(student.detach().to(dtype), dim=-1)  # log p, then p, then the gradient
    top = buf.gather(-1, ids)
    buf.exp_()
    buf.scatter_(-1, ids, 0.0)
    rest = buf.sum(dim=-1)  # summed directly: no cancellation when the ids hold nearly all mass
    lowest = torch.finfo(dtype).min
    with torch.enable_grad():
        buckets = torch.cat([top, rest.log().clamp_min(lowest).unsqueeze(-1)], dim=-1)
        buckets.requires_grad_()
        values = _bucket_divergence(buckets, logprobs, tail_mass, full, **opts)
        (g,) = torch.autograd.grad(values.sum(), buckets)
    total = g.sum(dim=-1)
    # an empty tail (k = V, or underflow) has p_j = 0 for every other token: no gradient there
    per_rest = torch.where(rest > 0, g[:, -1] / rest.clamp_min(torch.finfo(dtype).tiny), 0.0)
    buf.mul_((per_rest - total).unsqueeze(-1))
    buf.scatter_(-1, ids, g[:, :-1] - top.exp() * total.unsqueeze(-1))
    torch.mul(buf, grad_scale, out=grad_out)
    return values.detach()


def sparse_divergence(
    student_logits: Tensor,
    topk: TopK,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Divergence between the student and a top-k teacher, on k+1 buckets.

    Both distributions are collapsed onto the same k+1 buckets: the teacher's k top tokens
    ``topk.ids`` and one tail bucket holding everything else (``topk.tail_mass`` for the
    teacher; for the student, its probability outside ``topk.ids``). The divergence ``kind``
    (any of :func:`~potstill.losses.divergences.divergence` but ``"mse"``) is then taken
    between the two bucketed distributions, summed over buckets and averaged over the positions
    where ``mask`` is true, exactly as ``divergence`` does (0 for an empty mask).

    Temperature: the bucketed distributions are tempered, i.e. each side's bucket
    log-probabilities at T = 1 (the stored ``topk.logprobs`` and log tail, and the student's
    ``log_softmax(student_logits)`` gathered and tail-summed) become
    ``log_softmax(bucket_logp / temperature)`` over the k+1 buckets. For ``k < V`` this is not
    the bucketing of the tempered dense distribution (the tail bucket's mass is tempered as one
    token), but it needs nothing beyond the k+1 stored numbers. With ``k = V`` (ids then a
    permutation of the vocabulary) the tail is empty on both sides, ``topk.tail_mass`` is
    ignored as rounding error, and the result equals the dense ``divergence`` at the same
    temperature.

    ``student_logits`` is ``(..., V)``; ``topk`` fields are ``(..., k)`` and ``(...)``.
    Gradients flow to ``student_logits``. ``"mse"`` raises ValueError: it compares raw logits,
    which top-k log-probabilities do not determine.

    ``chunk_size=None`` computes all positions at once, with autograd; gradients then also flow
    to ``topk.logprobs``/``tail_mass`` if they require grad (:meth:`TopK.from_logits` detaches
    them). An int computes ``chunk_size`` flattened positions at a time with the machinery of
    :func:`chunked_divergence` (the student gradient computed chunk by chunk in forward, here
    through the k+1 buckets in closed form, and only scaled in backward; value only under
    ``no_grad``), so the
    ``V``-wide float32 intermediates exist for one chunk at a time; the top-k targets then get
    no gradient, and double backward is not supported.
    """
    if kind == "mse":
        raise ValueError(
            "'mse' compares dense logits and cannot be computed from top-k log-probabilities; "
            "use divergence() or chunked_divergence() with the teacher's logits"
        )
    validate(kind, temperature, chunk_size, beta, skew)
    if student_logits.dim() < 1 or topk.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k leading dims {tuple(topk.ids.shape[:-1])} must equal the student logits' "
            f"leading dims (student logits {tuple(student_logits.shape)})"
        )
    if topk.k > student_logits.shape[-1]:
        raise ValueError(f"k={topk.k} exceeds the vocabulary V={student_logits.shape[-1]}")
    check_mask(mask, student_logits.shape)
    opts = {"kind": kind, "temperature": temperature, "beta": beta, "skew": skew}

    if chunk_size is not None:
        vocab, k = student_logits.shape[-1], topk.k
        targets = (
            topk.ids.reshape(-1, k),
            topk.logprobs.detach().reshape(-1, k),
            topk.tail_mass.detach().reshape(-1),
        )
        dtype = compute_dtype(student_logits, topk.logprobs, topk.tail_mass)
        chunk_fn = functools.partial(_sparse_chunk, **opts)
        student = student_logits.reshape(-1, vocab)
        return chunked_loss(chunk_fn, student, targets, mask, chunk_size, dtype)

    per_position = _sparse_per_position(
        student_logits, topk.ids, topk.logprobs, topk.tail_mass, **opts
    )
    if mask is None:
        return per_position.mean() if per_position.numel() else per_position.sum()
    total = torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
    return total / mask.sum().clamp_min(1)
