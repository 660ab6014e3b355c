"""Divergences between student and teacher logits, and Hinton's knowledge-distillation loss.

Pure tensor functions; half-precision inputs are computed in float32, float64 stays in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DIVERGENCES", "SKEW_DIVERGENCES", "divergence", "kd_loss", "soft_target_loss"]


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) per position, summed over the last dim; entries where p == 0 contribute 0."""
    # One fused kernel. Clamping -inf to the dtype's lowest finite value keeps 0·(−inf − x) from
    # giving NaN in the value and the gradient: exp(lowest) is exactly 0.
    lowest = torch.finfo(log_p.dtype).min
    return F.kl_div(
        log_q.clamp_min(lowest), log_p.clamp_min(lowest), reduction="none", log_target=True
    ).sum(dim=-1)


def _forward_kl(log_p_student: Tensor, log_p_teacher: Tensor, **_: float) -> Tensor:
    """KL(teacher‖student): mean-seeking, the classic distillation direction."""
    return _kl(log_p_teacher, log_p_student)


def _reverse_kl(log_p_student: Tensor, log_p_teacher: Tensor, **_: float) -> Tensor:
    """KL(student‖teacher): mode-seeking."""
    return _kl(log_p_student, log_p_teacher)


def _generalized_jsd(
    log_p_student: Tensor, log_p_teacher: Tensor, *, beta: float = 0.5, **_: float
) -> Tensor:
    """Generalized JSD of GKD: ``beta*KL(T‖M) + (1-beta)*KL(S‖M)``, ``M = beta*T + (1-beta)*S``.

    At ``beta`` 0 or 1 the mixture equals one of the two distributions, so the value is 0.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    # math.log(0) raises, and a -inf weight would only add work: M is then simply S or T.
    if beta == 0.0:
        log_m = log_p_student
    elif beta == 1.0:
        log_m = log_p_teacher
    else:
        log_m = torch.logsumexp(
            torch.stack([log_p_teacher + math.log(beta), log_p_student + math.log1p(-beta)]),
            dim=0,
        )
    return beta * _kl(log_p_teacher, log_m) + (1.0 - beta) * _kl(log_p_student, log_m)


def _total_variation(log_p_student: Tensor, log_p_teacher: Tensor, **_: float) -> Tensor:
    """Total variation distance ``0.5 * Σ|pT − pS|``, in [0, 1]."""
    return 0.5 * (log_p_teacher.exp() - log_p_student.exp()).abs().sum(dim=-1)


def _squared_error(student: Tensor, teacher: Tensor, **_: float) -> Tensor:
    """Squared error between temperature-scaled logits, summed over the vocabulary."""
    return (student - teacher).square().sum(dim=-1)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "fkl": _forward_kl,
    "rkl": _reverse_kl,
    "jsd": _generalized_jsd,
    "tvd": _total_variation,
    "mse": _squared_error,
}
"""Kind → per-position function ``(student, teacher, **opts) -> Tensor`` of shape ``(...)``.

Each function sums over the last (vocabulary) dim. Inputs are log-probabilities, except for the
kinds in ``ON_LOGITS`` ("mse"), which receive the temperature-scaled logits.
"""


def _log_mixture(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """``log(weight·a + (1 − weight)·b)`` from log-probabilities, stably (logsumexp).

    At ``weight`` 0 or 1 the mixture is one of the inputs; returned as is because ``log(0)``
    would raise and a ``-inf`` term only adds work.
    """
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    return torch.logsumexp(
        torch.stack([log_a + math.log(weight), log_b + math.log1p(-weight)]), dim=0
    )


def check_skew(skew: float) -> None:
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must lie in [0, 1], got {skew}")


def _skew_forward_kl(
    log_p_student: Tensor, log_p_teacher: Tensor, *, skew: float = 0.1, **_: float
) -> Tensor:
    """Skew forward KL of DistiLLM: ``KL(T ‖ skew·T + (1 − skew)·S)``.

    The teacher share in the mixture bounds the log-ratio by ``−log(skew)``, which keeps the
    gradient from exploding where the student puts almost no mass. ``skew`` 0 gives "fkl",
    ``skew`` 1 gives 0.
    """
    check_skew(skew)
    return _kl(log_p_teacher, _log_mixture(log_p_teacher, log_p_student, skew))


def _skew_reverse_kl(
    log_p_student: Tensor, log_p_teacher: Tensor, *, skew: float = 0.1, **_: float
) -> Tensor:
    """Skew reverse KL of DistiLLM: ``KL(S ‖ skew·S + (1 − skew)·T)``.

    ``skew`` 0 gives "rkl", ``skew`` 1 gives 0.
    """
    check_skew(skew)
    return _kl(log_p_student, _log_mixture(log_p_student, log_p_teacher, skew))


SKEW_DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "skl": _skew_forward_kl,
    "srkl": _skew_reverse_kl,
}
"""The skew KL kinds of DistiLLM (Ko et al., 2024): a part of :data:`DIVERGENCES`, listed apart
because they take the option ``skew``."""

DIVERGENCES.update(SKEW_DIVERGENCES)


def divergence_fn(kind: str) -> Callable[..., Tensor]:
    """The per-position function of ``kind``; ValueError listing every accepted kind otherwise."""
    if kind not in DIVERGENCES:
        raise ValueError(
            f"unknown divergence kind {kind!r}; accepted kinds: {', '.join(sorted(DIVERGENCES))}"
        )
    return DIVERGENCES[kind]


# MSE compares logits, not distributions: it is not invariant to a per-row shift of the logits.
ON_LOGITS = frozenset({"mse"})


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Common dtype of ``tensors``, at least float32 so half-precision inputs keep accuracy."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)


def check_logits(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape, got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def check_mask(mask: Tensor | None, logits_shape: torch.Size) -> None:
    """Mask must be None or a bool tensor of the logits' leading shape (as in divergence)."""
    if mask is None:
        return
    leading = logits_shape[:-1]
    if mask.shape != leading:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits' leading dims "
            f"{tuple(leading)} (logits shape {tuple(logits_shape)})"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}; use mask.bool()")


def per_position(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float,
    beta: float,
    skew: float,
) -> Tensor:
    """Per-position divergence ``(...)`` of logits ``(..., V)``, in the compute dtype.

    The body of :func:`divergence` without validation or reduction, for the chunked losses
    (:mod:`potstill.losses.closed_form`), which validate once and call this once per chunk.
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    student = student_logits.to(dtype) / temperature
    teacher = teacher_logits.to(dtype) / temperature
    if kind not in ON_LOGITS:
        student = F.log_softmax(student, dim=-1)
        teacher = F.log_softmax(teacher, dim=-1)
    return divergence_fn(kind)(student, teacher, beta=beta, skew=skew)


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Tensor | None = None,
    skew: float = 0.1,
) -> Tensor:
    """Divergence of kind ``kind`` between student and teacher, averaged over positions.

    Both logits have shape ``(..., V)`` and are divided by ``temperature`` before the softmax;
    for ``"mse"`` the squared error is taken directly on the logits divided by ``temperature``.
    The per-position value is summed over ``V`` and averaged over the leading positions where
    ``mask`` (bool, shape ``(...)``) is true, or over all positions when ``mask`` is None. A mask
    with no true position gives exactly 0 with the graph attached. No ``T²`` factor is applied.

    Kinds (see :data:`DIVERGENCES`): ``"fkl"`` KL(teacher‖student), ``"rkl"`` KL(student‖teacher),
    ``"jsd"`` the generalized JSD of GKD (Agarwal et al., 2024) weighted by ``beta`` (0 for
    ``beta`` in {0, 1}), ``"tvd"`` total variation, ``"mse"`` squared error of scaled logits;
    and (see :data:`SKEW_DIVERGENCES`) ``"skl"`` skew forward KL(T ‖ skew·T + (1 − skew)·S) and
    ``"srkl"`` skew reverse KL(S ‖ skew·S + (1 − skew)·T) of DistiLLM (Ko et al., 2024), with
    ``skew`` in [0, 1]; both are 0 at ``skew`` 1 and plain "fkl"/"rkl" at ``skew`` 0.

    The teacher is not detached: callers pass detached teacher logits if they want no gradient
    there. Half-precision inputs are computed and returned in float32. Logits must be finite
    (magnitudes like 1e4 are fine); ``-inf`` entries give NaN gradients for ``"jsd"``.
    """
    divergence_fn(kind)  # raises on an unknown kind, listing the accepted ones
    check_logits(student_logits, teacher_logits, temperature)
    check_mask(mask, student_logits.shape)
    values = per_position(
        student_logits, teacher_logits, kind, temperature=temperature, beta=beta, skew=skew
    )

    if mask is None:
        # no positions at all gives 0 rather than the NaN of an empty mean
        return values.mean() if values.numel() else values.sum()
    # where + clamped count instead of boolean indexing: no host sync, and an empty mask gives
    # 0 / 1 = 0 with the graph still attached.
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


def soft_target_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float
) -> Tensor:
    """Hinton's soft-target term ``T² * KL(softmax(t/T) ‖ softmax(s/T))``, mean over rows.

    Logits have shape ``(..., C)``; every leading position is a row (``batchmean``). The ``T²``
    factor keeps the gradient scale roughly independent of ``T``.
    """
    kl = divergence(student_logits, teacher_logits, "fkl", temperature=temperature)
    return temperature**2 * kl


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
) -> Tensor:
    """Hinton et al. (2015) distillation loss.

    Returns ``alpha * soft_target_loss + (1 - alpha) * CE(student_logits, labels)``, where the
    cross-entropy uses the plain (T = 1) logits and is averaged over rows whose label is not
    ``ignore_index``; when every row is ignored it is 0 (not NaN), still with a graph. Logits have
    shape ``(..., C)`` and ``labels`` shape ``(...)``.

    With ``labels=None`` there is nothing to mix with: the result is ``soft_target_loss`` alone
    and ``alpha`` is ignored.
    """
    soft = soft_target_loss(student_logits, teacher_logits, temperature=temperature)
    if labels is None:
        return soft
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' leading dims "
            f"{tuple(student_logits.shape[:-1])}"
        )
    num_classes = student_logits.shape[-1]
    logits = student_logits.reshape(-1, num_classes).to(compute_dtype(student_logits))
    flat_labels = labels.reshape(-1)
    ce_sum = F.cross_entropy(logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    # reduction="mean" would divide by zero when every row is ignored.
    ce = ce_sum / (flat_labels != ignore_index).sum().clamp_min(1)
    return alpha * soft + (1.0 - alpha) * ce
