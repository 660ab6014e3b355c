"""Relational distillation: RKD distance and angle (Park et al., 2019) and PKT (Passalis &
Tefas, 2018).

These losses compare the structure of a batch (distances, angles, similarities between
samples) rather than features one to one, so student and teacher widths may differ. Inputs
``(B, ...)`` are flattened to ``(B, D)``; ``B`` must match. Pure tensor functions;
half-precision inputs are computed in float32, float64 stays in float64. The teacher is never
detached here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .divergences import compute_dtype

__all__ = ["pkt", "rkd_angle", "rkd_distance"]

# Floor on squared distances: keeps sqrt and its gradient finite for coincident points.
_SQ_DIST_MIN = 1e-12


def _flatten_pair(
    student: Tensor, teacher: Tensor, min_batch: int, what: str
) -> tuple[Tensor, Tensor]:
    """Both inputs flattened to ``(B, D)`` in the common compute dtype, after shape checks."""
    if student.dim() < 1 or teacher.dim() < 1:
        raise ValueError(
            f"{what} needs batched inputs (B, ...), got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{what} needs the same batch size for student and teacher, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    batch = student.shape[0]
    if batch < min_batch:
        raise ValueError(
            f"{what} needs a batch of at least {min_batch} samples, got {batch} "
            f"(student {tuple(student.shape)}, teacher {tuple(teacher.shape)})"
        )
    dtype = compute_dtype(student, teacher)
    return student.to(dtype).reshape(batch, -1), teacher.to(dtype).reshape(batch, -1)


def _normalized_distances(x: Tensor, off_diag: Tensor) -> Tensor:
    """Pairwise Euclidean distances of ``(B, D)`` rows divided by their mean over i ≠ j.

    The diagonal is set to 0. Rows are centred first (distances are translation-invariant)
    to reduce cancellation in ``‖a‖² + ‖b‖² − 2⟨a, b⟩``; squared distances are floored at
    1e-12, so coincident points have distance 1e-6 and finite gradients.
    """
    x = x - x.mean(dim=0, keepdim=True)
    sq_norms = x.square().sum(dim=1)
    sq = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (x @ x.T)).clamp_min(_SQ_DIST_MIN)
    # where (not multiplication) so the diagonal's sqrt gradient never enters the graph
    dist = torch.where(off_diag, sq.sqrt(), torch.zeros_like(sq))
    n = x.shape[0]
    mean = dist.sum() / (n * (n - 1))
    return dist / mean


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance-wise loss (Park et al., 2019).

    With ``ψ(i, j) = ‖x_i − x_j‖₂`` for ``i ≠ j``, each model's distances are divided by their
    mean over the ``B(B−1)`` pairs ``i ≠ j``; the loss is the mean over those pairs of the
    smooth-L1 (Huber, ``beta = 1``) term between teacher and student normalized distances.
    (The official code averages over all ``B²`` entries, zero diagonal included; that value is
    ``(B−1)/B`` times ours.) Invariant to uniform scaling and to translation of either
    embedding. Requires ``B ≥ 2``.
    """
    s, t = _flatten_pair(student, teacher, 2, "rkd_distance")
    n = s.shape[0]
    off_diag = ~torch.eye(n, dtype=torch.bool, device=s.device)
    s_d = _normalized_distances(s, off_diag)
    t_d = _normalized_distances(t, off_diag)
    per_pair = F.smooth_l1_loss(s_d, t_d, reduction="none", beta=1.0)
    return torch.where(off_diag, per_pair, torch.zeros_like(per_pair)).sum() / (n * (n - 1))


def _angles(x: Tensor, off_diag: Tensor) -> Tensor:
    """``A[j, i, k] = ⟨e_ij, e_kj⟩`` with ``e_ij = normalize(x_i − x_j)``; shape ``(B, B, B)``.

    ``e_jj`` (the zero vector) is set to exactly 0, so angles with a degenerate side are 0, as
    in the official code, and no ``1/eps`` gradient of normalizing a zero vector is formed.
    """
    diff = x[None, :, :] - x[:, None, :]  # diff[j, i] = x_i − x_j
    unit = F.normalize(diff, p=2, dim=2, eps=1e-12)
    unit = torch.where(off_diag[:, :, None], unit, torch.zeros_like(unit))
    return unit @ unit.transpose(1, 2)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle-wise loss (Park et al., 2019).

    For every triplet ``(i, j, k)`` with vertex ``j``, ``cos ∠ijk = ⟨e_ij, e_kj⟩`` with
    ``e_ij = (x_i − x_j) / ‖x_i − x_j‖₂``. The loss is the mean over all ``B³`` entries (as in
    the official code: entries with ``i = j`` or ``k = j`` are 0 for both models and count in
    the denominator) of the smooth-L1 (``beta = 1``) term between teacher and student
    cosines. Invariant to scaling and translation of either embedding. Memory is
    ``O(B²·D + B³)``. Requires ``B ≥ 3``.
    """
    s, t = _flatten_pair(student, teacher, 3, "rkd_angle")
    off_diag = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    return F.smooth_l1_loss(_angles(s, off_diag), _angles(t, off_diag), beta=1.0)


def _conditional_probs(x: Tensor) -> Tensor:
    """PKT's row-normalized similarity: ``((cos + 1) / 2)`` with rows summing to 1."""
    unit = F.normalize(x, p=2, dim=1, eps=1e-12)
    sim = (unit @ unit.T + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, 2018), cosine-kernel formulation.

    Features are L2-normalized (``x / max(‖x‖, 1e-12)``), turned into cosine-similarity
    matrices, mapped to ``[0, 1]`` by ``(cos + 1) / 2`` and row-normalized into conditional
    probabilities ``p_{j|i}`` (the diagonal included, as in the official code). The loss is::

        (1 / B) · Σ_ij t_ij · log((t_ij + eps) / (s_ij + eps))

    The paper sums over ``i, j`` and the official code takes the mean over all ``B²`` entries;
    we average over rows (the divergence of each row, summed over ``j``, averaged over ``i``)
    so the value does not grow with the batch. Identical inputs give exactly 0. Requires
    ``B ≥ 2``.
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    s, t = _flatten_pair(student, teacher, 2, "pkt")
    s_p = _conditional_probs(s)
    t_p = _conditional_probs(t)
    return (t_p * torch.log((t_p + eps) / (s_p + eps))).sum() / s.shape[0]
