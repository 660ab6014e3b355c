"""Intermediate-feature distillation: feature distances, projectors and layer mappings.

Pure tensor functions; half-precision inputs are computed in float32, float64 stays in float64.
The teacher is never detached here: callers pass detached teacher features if they want no
gradient there.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .divergences import compute_dtype

__all__ = [
    "FEATURE_KINDS",
    "ConvProjector",
    "explicit_layer_map",
    "feature_distance",
    "last_k_layer_map",
    "make_projector",
    "uniform_layer_map",
]

FEATURE_KINDS: tuple[str, ...] = ("mse", "smooth_l1", "cosine")
"""Accepted ``kind`` values of :func:`feature_distance`."""

_NORMALIZE_EPS = 1e-12


def _check_feature_dim(x: Tensor, dim: int) -> int:
    """``dim`` as a non-negative index into ``x``'s dims; ValueError when out of range."""
    if x.dim() < 1:
        raise ValueError("features must have at least one dimension (the feature dim)")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"feature dim {dim} is out of range for features of shape {tuple(x.shape)}"
        )
    return dim % x.dim()


def _mean_or_zero(x: Tensor) -> Tensor:
    """Mean of ``x``; an empty tensor gives 0 (with the graph) rather than NaN."""
    return x.mean() if x.numel() else x.sum()


def feature_distance(
    student: Tensor,
    teacher: Tensor,
    kind: str = "mse",
    *,
    dim: int = -1,
    normalize: bool = False,
    beta: float = 1.0,
) -> Tensor:
    """Distance of kind ``kind`` between student and teacher features of the same shape.

    ``dim`` is the feature (channel) dim: -1 for token or vector features ``(B, T, D)`` /
    ``(B, D)``, 1 for image feature maps ``(B, C, H, W)``. With ``normalize=True`` both inputs
    are first L2-normalized along ``dim`` (``x / max(‖x‖, 1e-12)``). Features of different
    widths must be projected first (see :func:`make_projector`).

    Kinds (see :data:`FEATURE_KINDS`):

    - ``"mse"``: mean of the squared differences over all elements (FitNets).
    - ``"smooth_l1"``: mean over all elements of the Huber / smooth-L1 term with threshold
      ``beta``, exactly as ``torch.nn.functional.smooth_l1_loss``: ``0.5·d²/beta`` where
      ``|d| < beta``, else ``|d| − 0.5·beta`` (plain L1 for ``beta == 0``).
    - ``"cosine"``: mean over all positions (every index except ``dim``) of
      ``1 − cos(student, teacher)`` along ``dim``; invariant to positive per-position scaling.

    Returns a scalar tensor in at least float32; empty inputs give 0 rather than NaN.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(
            f"unknown feature distance kind {kind!r}; accepted kinds: {', '.join(FEATURE_KINDS)}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            "student and teacher features must have the same shape, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}; "
            "project the student first (see make_projector)"
        )
    dim = _check_feature_dim(student, dim)
    if not beta >= 0:
        raise ValueError(f"beta must be non-negative, got {beta}")

    dtype = compute_dtype(student, teacher)
    s = student.to(dtype)
    t = teacher.to(dtype)
    if normalize:
        s = F.normalize(s, dim=dim, eps=_NORMALIZE_EPS)
        t = F.normalize(t, dim=dim, eps=_NORMALIZE_EPS)

    if kind == "mse":
        return _mean_or_zero((s - t).square())
    if kind == "smooth_l1":
        return _mean_or_zero(F.smooth_l1_loss(s, t, reduction="none", beta=beta))
    return _mean_or_zero(1.0 - F.cosine_similarity(s, t, dim=dim))


# --- projectors ---


class ConvProjector(nn.Module):
    """A 1×1 convolution ``C_s → C_t``, then a bilinear resize to ``size`` when one is given.

    Maps student feature maps ``(B, C_s, H_s, W_s)`` to the teacher's ``(B, C_t, H_t, W_t)``.
    The resize uses ``align_corners=False`` and no antialiasing.
    """

    def __init__(
        self, in_channels: int, out_channels: int, size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.size = None if size is None else (int(size[0]), int(size[1]))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.size is not None and tuple(y.shape[-2:]) != self.size:
            y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)
        return y

    def extra_repr(self) -> str:
        return f"size={self.size}"


def make_projector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module | None:
    """A trainable module mapping student features to the teacher's shape, or None if they match.

    Shapes are full tensor shapes including the batch dim (whose size is not compared):

    - 2-D ``(B, D)`` or 3-D ``(B, T, D)``: ``nn.Linear(D_s, D_t)`` over the last dim; the dims
      between batch and features (``T``) must already match.
    - 4-D ``(B, C, H, W)``: a :class:`ConvProjector` (1×1 ``nn.Conv2d(C_s, C_t, 1)``, then a
      bilinear resize to the teacher's ``(H, W)`` when the spatial sizes differ).

    Returns None when the feature dims (and, for maps, spatial sizes) are already equal: the
    features can then be compared directly.
    """
    s_shape = tuple(int(n) for n in student_shape)
    t_shape = tuple(int(n) for n in teacher_shape)
    if len(s_shape) != len(t_shape):
        raise ValueError(
            f"student shape {s_shape} and teacher shape {t_shape} must have the same rank"
        )
    rank = len(s_shape)
    if rank in (2, 3):
        if s_shape[1:-1] != t_shape[1:-1]:
            raise ValueError(
                f"student shape {s_shape} and teacher shape {t_shape} differ in a dim other "
                "than batch and features; only the last (feature) dim can be projected"
            )
        d_s, d_t = s_shape[-1], t_shape[-1]
        return None if d_s == d_t else nn.Linear(d_s, d_t)
    if rank == 4:
        c_s, c_t = s_shape[1], t_shape[1]
        s_hw, t_hw = s_shape[2:], t_shape[2:]
        if c_s == c_t and s_hw == t_hw:
            return None
        return ConvProjector(c_s, c_t, None if s_hw == t_hw else (t_hw[0], t_hw[1]))
    raise ValueError(
        f"cannot build a projector for rank-{rank} features (student {s_shape}, teacher "
        f"{t_shape}); expected (B, D), (B, T, D) or (B, C, H, W)"
    )


# --- layer mappings: (student layer, teacher layer), 0-based ---


def _check_count(name: str, n: int) -> int:
    if isinstance(n, bool):
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"{name} must be a positive int, got {n!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be positive, got {n}")
    return n


def uniform_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform mapping: student layer ``i`` ↔ teacher ``round((i+1)·Lt/Ls) − 1``.

    With ``Ls = n_student`` and ``Lt = n_teacher``, every student layer is matched, and the last
    student layer always maps to the last teacher layer. Rounding is half-up,
    ``floor(x + 0.5)`` (done in exact integer arithmetic), not Python's banker's ``round``:
    ``uniform_layer_map(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]``. Requires
    ``1 ≤ n_student ≤ n_teacher``.
    """
    n_s = _check_count("n_student", n_student)
    n_t = _check_count("n_teacher", n_teacher)
    if n_s > n_t:
        raise ValueError(
            f"uniform layer map needs n_student <= n_teacher, got n_student={n_s} and "
            f"n_teacher={n_t}"
        )
    # floor((i+1)·Lt/Ls + 1/2) == (2·(i+1)·Lt + Ls) // (2·Ls), without float error.
    return [(i, (2 * (i + 1) * n_t + n_s) // (2 * n_s) - 1) for i in range(n_s)]


def last_k_layer_map(n_student: int, n_teacher: int, k: int) -> list[tuple[int, int]]:
    """The last ``k`` student layers ↔ the last ``k`` teacher layers, in order.

    ``last_k_layer_map(6, 12, 3) == [(3, 9), (4, 10), (5, 11)]``. Requires
    ``1 ≤ k ≤ min(n_student, n_teacher)``.
    """
    n_s = _check_count("n_student", n_student)
    n_t = _check_count("n_teacher", n_teacher)
    k = _check_count("k", k)
    if k > min(n_s, n_t):
        raise ValueError(
            f"k={k} is out of range: it must lie in [1, min(n_student, n_teacher)] = "
            f"[1, {min(n_s, n_t)}] (n_student={n_s}, n_teacher={n_t})"
        )
    return [(n_s - k + m, n_t - k + m) for m in range(k)]


def explicit_layer_map(
    pairs: Iterable[tuple[int, int]], n_student: int, n_teacher: int
) -> list[tuple[int, int]]:
    """Validate user-given ``(student layer, teacher layer)`` pairs and return them as a list.

    Indices are 0-based and must satisfy ``0 ≤ s < n_student`` and ``0 ≤ t < n_teacher``
    (negative indices are rejected). Order and repeats are kept as given. ValueError names the
    offending pair; an empty mapping is an error too.
    """
    n_s = _check_count("n_student", n_student)
    n_t = _check_count("n_teacher", n_teacher)
    result: list[tuple[int, int]] = []
    for pair in pairs:
        try:
            s_raw, t_raw = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"layer pair {pair!r} must be a (student layer, teacher layer) pair"
            ) from None
        if isinstance(s_raw, bool) or isinstance(t_raw, bool):
            raise ValueError(f"layer pair {pair!r} must hold ints, not bools")
        try:
            s, t = operator.index(s_raw), operator.index(t_raw)
        except TypeError:
            raise ValueError(f"layer pair {pair!r} must hold ints") from None
        if not 0 <= s < n_s:
            raise ValueError(
                f"layer pair {pair!r}: student layer {s} is out of range [0, {n_s - 1}] "
                f"(n_student={n_s})"
            )
        if not 0 <= t < n_t:
            raise ValueError(
                f"layer pair {pair!r}: teacher layer {t} is out of range [0, {n_t - 1}] "
                f"(n_teacher={n_t})"
            )
        result.append((s, t))
    if not result:
        raise ValueError("layer map must contain at least one (student, teacher) pair")
    return result
