"""The chunk engine of the memory-lean divergences for LLM distillation (:mod:`.chunked`: dense
logits; :mod:`.fused`: fused with the output layer; :mod:`.sparse`: top-k teacher targets).

With vocabularies of 50k–250k tokens, the ``(positions × V)`` float32 intermediates of
:func:`~potstill.losses.divergences.divergence` (scaled logits, log-probabilities, the pointwise
KL, their gradients) dominate training memory. The functions here give the same values and
gradients as ``divergence`` while holding such intermediates for one chunk of positions at a
time:

* :func:`chunked_divergence` takes dense student and teacher logits;
* :func:`fused_linear_divergence` takes the student's last hidden states and output weight, so
  the student's full logits never exist;
* :func:`sparse_divergence` takes a :class:`TopK` summary of the teacher (k ids, their
  log-probabilities and the tail mass) instead of dense teacher logits; with ``chunk_size`` it
  is chunked too, by the same machinery.

Gradient in forward, one pass. When a gradient will be needed (grad mode on and the student
requires grad), forward computes each chunk's value *and* its gradient and keeps only the
gradients: the student-logit gradient (the one ``N × V`` tensor, in the student's dtype, that
backward would have to create anyway), or for the fused form the gradients of the hidden states
``(N × H)``, weight and bias. The dense kinds compute value and closed-form gradient together, in
place, from the two log-softmaxes (three or four chunk-sized buffers at the peak); the sparse one
differentiates only the small ``(n, k+1)`` bucket tensor with autograd and carries that to the
``V`` logits in closed form, in one chunk-sized buffer. Backward only scales the stored gradients
by the incoming gradient, in place (not at all when it is 1), and hands them over without a copy:
nothing is recomputed. Under ``torch.no_grad()`` (or when nothing requires grad) forward computes
the value alone, which is cheaper: evaluate under ``no_grad``, or the gradient is computed, and
held until the loss is freed, for nothing. A second backward through a retained graph
(``backward(retain_graph=True)`` then ``backward()``) recomputes the gradients from the saved
inputs. Double backward is not supported: the gradients are constants, with no graph even under
``create_graph=True``.

Peak memory is therefore the inputs, the gradients and a few ``chunk_size × V`` buffers;
``chunk_size=None`` picks :func:`default_chunk_size`, a fixed number of logits per chunk
(:data:`DEFAULT_CHUNK_ELEMENTS`). The teacher never gets a gradient from these losses: teacher
logits (or top-k targets) are targets (pass them detached; a teacher tensor that requires grad
gets ``None``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import closed_form
from .divergences import check_logits, check_mask, check_skew, compute_dtype, divergence_fn

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "chunked_divergence",
    "default_chunk_size",
    "single_backward",
]

DEFAULT_CHUNK_ELEMENTS = 2**23
"""Logits per chunk (``chunk_size × V``) when ``chunk_size`` is not given: 32 MiB per float32
chunk-sized buffer, whatever the vocabulary (170 positions at V = 49,152)."""

_SINGLE_BACKWARD = threading.local()


@contextlib.contextmanager
def single_backward() -> Iterator[None]:
    """Losses built inside hold nothing for a second backward pass: the chunked and fused
    divergences keep their inputs (student and teacher logits) only so that a backward through
    a retained graph can recompute their gradients. A training step that backpropagates once
    (the :class:`~potstill.Distiller`'s) lets them go: for SmolLM2 at 4 × 512 tokens, about
    400 MB per logits tensor. A second backward through such a loss raises RuntimeError."""
    before = getattr(_SINGLE_BACKWARD, "on", False)
    _SINGLE_BACKWARD.on = True
    try:
        yield
    finally:
        _SINGLE_BACKWARD.on = before


def save_inputs(ctx: Any, *tensors: Tensor | None) -> None:
    """Save ``tensors`` for a second backward, unless inside :func:`single_backward`."""
    ctx.single = getattr(_SINGLE_BACKWARD, "on", False)
    if not ctx.single:
        ctx.save_for_backward(*tensors)


def no_second_backward(ctx: Any) -> None:
    if ctx.single:
        raise RuntimeError(
            "backward through a divergence built under single_backward() a second time: its "
            "inputs were not kept; build the loss again (or outside single_backward())"
        )


def default_chunk_size(vocab: int) -> int:
    """Positions per chunk when ``chunk_size`` is None: ``DEFAULT_CHUNK_ELEMENTS // vocab``.

    A chunk holds a handful of float32 ``chunk_size × V`` buffers at once, so this bounds the
    loss's working memory (about 200 MiB) independently of V, while keeping each tensor
    operation large enough (millions of elements) for intra-op threads and GPU kernels to run
    efficiently; much smaller chunks mean many small operations, each paying the threads' (or
    a kernel launch's) fixed cost.
    """
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))


# chunk_fn(student rows, *target rows, grad_out, grad_scale) -> per-position values; when
# grad_out is a tensor it also writes grad_scale · ∂ Σ values / ∂ student rows into grad_out.
ChunkFn = Callable[..., Tensor]


def _check_chunk_size(chunk_size: int) -> None:
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def flatten_mask(
    mask: Tensor | None, rows: int, device: torch.device
) -> tuple[Tensor | None, int | Tensor]:
    """``(flat mask or None, denominator)``: the mean is over the masked rows, or all rows.

    The denominator is at least 1 so an empty mask (or no rows) gives 0, as in ``divergence``.
    It stays a tensor for a mask, so there is no host sync, as in ``divergence``.
    """
    if mask is None:
        return None, max(rows, 1)
    flat = mask.reshape(-1).to(device)
    return flat, flat.sum().clamp_min(1)


def chunk_total(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Sum of a chunk's per-position values over its masked rows."""
    if mask is None:
        return per_position.sum()
    # where, not indexing: no host sync, and masked rows add exactly 0 even if not finite
    return torch.where(mask, per_position, torch.zeros_like(per_position)).sum()


def mean_scale(denominator: int | Tensor, dtype: torch.dtype) -> float | Tensor:
    """``1 / denominator``, the gradient of the mean w.r.t. each summed value, in ``dtype``."""
    if isinstance(denominator, Tensor):
        return denominator.to(dtype).reciprocal()
    return 1.0 / denominator


def zero_unmasked(grad: Tensor, mask: Tensor | None) -> None:
    """Rows outside ``mask`` get exactly 0, even where their logits are not finite (autograd
    through ``divergence`` gives NaN there: log_softmax's backward multiplies the zero gradient
    of those rows by their non-finite probabilities)."""
    if mask is not None:
        grad.masked_fill_(~mask.unsqueeze(-1), 0)


def is_one(grad_output: Tensor) -> bool:
    # One host sync per backward, which saves a pass over the gradients for an unweighted loss.
    return bool(grad_output == 1)


# --- the chunked machinery ---


def _chunked_mean(
    chunk_fn: ChunkFn,
    student: Tensor,
    targets: tuple[Tensor, ...],
    mask: Tensor | None,
    denominator: int | Tensor,
    chunk_size: int,
    dtype: torch.dtype,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(masked mean of chunk_fn's values, its gradient w.r.t. student or None)``, one chunk
    of rows at a time. The gradient is the one ``N × V`` tensor, in the student's dtype."""
    total = student.new_zeros((), dtype=dtype)
    grad = torch.empty_like(student) if need_grad else None
    scale = mean_scale(denominator, dtype)
    for start in range(0, student.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        chunk_mask = None if mask is None else mask[rows]
        chunk_grad = None if grad is None else grad[rows]
        values = chunk_fn(student[rows], *(t[rows] for t in targets), chunk_grad, scale)
        total = total + chunk_total(values, chunk_mask)
        if chunk_grad is not None:
            zero_unmasked(chunk_grad, chunk_mask)
    return total / denominator, grad


class _ChunkedMean(torch.autograd.Function):
    """Masked mean over rows of a per-position loss of ``(N, V)`` student logits and row-wise
    targets, one chunk of rows at a time, with the student gradient computed in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: Tensor,
        mask: Tensor | None,
        denominator: int | Tensor,
        chunk_fn: ChunkFn,
        chunk_size: int,
        dtype: torch.dtype,
        *targets: Tensor,
    ) -> Tensor:
        value, ctx.grad = _chunked_mean(
            chunk_fn, student, targets, mask, denominator, chunk_size, dtype, need_grad=True
        )
        # the inputs, only for a second backward through a retained graph
        save_inputs(ctx, student, mask, *targets)
        ctx.options = (denominator, chunk_fn, chunk_size, dtype)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None  # hand the buffer over: no copy, no second reference
        denominator, chunk_fn, chunk_size, dtype = ctx.options
        if grad is None:  # second backward through a retained graph: compute it again
            no_second_backward(ctx)
            student, mask, *targets = ctx.saved_tensors
            _, grad = _chunked_mean(
                chunk_fn, student, tuple(targets), mask, denominator, chunk_size, dtype, True
            )
        if not is_one(grad_output):
            grad.mul_(grad_output)
        return (grad, *(None,) * (len(ctx.needs_input_grad) - 1))


def chunked_loss(
    chunk_fn: ChunkFn,
    student: Tensor,
    targets: tuple[Tensor, ...],
    mask: Tensor | None,
    chunk_size: int,
    dtype: torch.dtype,
) -> Tensor:
    """The masked mean of ``chunk_fn`` over the rows of ``student`` ``(N, V)``: through
    :class:`_ChunkedMean` when a gradient is needed, as a plain forward loop otherwise."""
    flat_mask, denominator = flatten_mask(mask, student.shape[0], student.device)
    if torch.is_grad_enabled() and student.requires_grad:
        return _ChunkedMean.apply(
            student, flat_mask, denominator, chunk_fn, chunk_size, dtype, *targets
        )
    with torch.no_grad():
        value, _ = _chunked_mean(
            chunk_fn, student, targets, flat_mask, denominator, chunk_size, dtype, False
        )
    return value


def validate(
    kind: str, temperature: float, chunk_size: int | None, beta: float, skew: float
) -> None:
    """The checks of ``divergence``, once before the chunks: beta and skew only for the kinds
    that use them."""
    divergence_fn(kind)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if kind in ("skl", "srkl"):
        check_skew(skew)
    if chunk_size is not None:
        _check_chunk_size(chunk_size)


def chunked_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """:func:`~potstill.losses.divergences.divergence`, computed ``chunk_size`` rows at a time.

    Same arguments, kinds and value as ``divergence`` (logits ``(..., V)``, optional bool
    ``mask`` of shape ``(...)``, mean over masked positions, 0 for an empty mask), with the
    same gradient, but float32 intermediates exist for one ``chunk_size × V`` chunk of the
    flattened positions at a time (``None``: :func:`default_chunk_size` of V, 170 positions at
    V = 49,152).

    When a gradient is needed (grad mode on and ``student_logits`` requires grad), forward
    computes each chunk's value and closed-form gradient in one pass and keeps the gradient,
    the only ``N × V`` tensor created (same dtype as ``student_logits``); backward scales it by
    the incoming gradient in place and recomputes nothing. Under ``torch.no_grad()`` only the
    value is computed. A second backward through a retained graph recomputes the gradient;
    double backward is not supported (the gradient carries no graph).

    Where ``divergence``'s autograd gives NaN, two cases get finite gradients here: positions
    outside ``mask`` get exactly 0 whatever their logits, and vocabulary entries that are
    ``-inf`` for both student and teacher (padding rows of an output matrix) get 0 in every
    kind. The teacher receives no gradient (``None``): teacher logits are detached targets.
    Non-contiguous logits are copied once by the flattening ``reshape``.
    """
    validate(kind, temperature, chunk_size, beta, skew)
    check_logits(student_logits, teacher_logits, temperature)
    check_mask(mask, student_logits.shape)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    chunk_fn = functools.partial(
        closed_form.dense_chunk, kind=kind, temperature=temperature, beta=beta, skew=skew
    )
    dtype = compute_dtype(student, teacher)
    return chunked_loss(chunk_fn, student, (teacher,), mask, chunk_size, dtype)
