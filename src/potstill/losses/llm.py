"""Memory-lean divergences for LLM distillation: chunked, fused with the output layer, sparse.

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
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .divergences import (
    _ON_LOGITS,
    _check_logits,
    _check_mask,
    _check_skew,
    _compute_dtype,
    _divergence_fn,
    _per_position,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "TopK",
    "chunked_divergence",
    "default_chunk_size",
    "fused_linear_divergence",
    "single_backward",
    "sparse_divergence",
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


def _save_inputs(ctx: Any, *tensors: Tensor | None) -> None:
    """Save ``tensors`` for a second backward, unless inside :func:`single_backward`."""
    ctx.single = getattr(_SINGLE_BACKWARD, "on", False)
    if not ctx.single:
        ctx.save_for_backward(*tensors)


def _no_second_backward(ctx: Any) -> None:
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


def _flat_mask(
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


def _chunk_total(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Sum of a chunk's per-position values over its masked rows."""
    if mask is None:
        return per_position.sum()
    # where, not indexing: no host sync, and masked rows add exactly 0 even if not finite
    return torch.where(mask, per_position, torch.zeros_like(per_position)).sum()


def _mean_scale(denominator: int | Tensor, dtype: torch.dtype) -> float | Tensor:
    """``1 / denominator``, the gradient of the mean w.r.t. each summed value, in ``dtype``."""
    if isinstance(denominator, Tensor):
        return denominator.to(dtype).reciprocal()
    return 1.0 / denominator


def _zero_unmasked(grad: Tensor, mask: Tensor | None) -> None:
    """Rows outside ``mask`` get exactly 0, even where their logits are not finite (autograd
    through ``divergence`` gives NaN there: log_softmax's backward multiplies the zero gradient
    of those rows by their non-finite probabilities)."""
    if mask is not None:
        grad.masked_fill_(~mask.unsqueeze(-1), 0)


def _is_one(grad_output: Tensor) -> bool:
    # One host sync per backward, which saves a pass over the gradients for an unweighted loss.
    return bool(grad_output == 1)


# --- values and closed-form gradients of the dense divergences, in one pass ---
#
# Each takes the student's and teacher's log-softmax of the scaled logits, ``log_p`` and
# ``log_q`` (clamped at the lowest finite value, as ``divergence``'s KL does), and returns the
# per-position values of the kind, computed as ``divergence`` does, and their gradient w.r.t.
# the scaled student logits ``s``. They work in place in their arguments, which _dense_chunk no
# longer needs, so that a chunk holds three or four V-wide buffers at its peak, and share the
# intermediates of value and gradient. With ``a = ∂ value / ∂ p`` (p the student's
# probabilities taken as free variables) and ``c = p · a``, the softmax's backward gives
# ``∂ value / ∂ s = c − p · Σc``.

ValueAndGrad = tuple[Tensor, Tensor]


def _softmax_backward(p: Tensor, c: Tensor, total: Tensor | None = None) -> Tensor:
    """``c − p · Σc``, in place in ``c`` (``p`` is overwritten too); ``total`` is ``Σc`` when the
    caller has it already."""
    total = c.sum(dim=-1, keepdim=True) if total is None else total.unsqueeze(-1)
    return c.sub_(p.mul_(total))


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """``log(weight·a + (1 − weight)·b)`` for ``0 < weight < 1``, a fresh tensor; the value of
    ``divergences._log_mixture`` with one buffer fewer than its ``logsumexp`` of a stack."""
    out = log_a + math.log(weight)
    return torch.logaddexp(out, log_b + math.log1p(-weight), out=out)


def _fkl(log_p: Tensor, log_q: Tensor, **_: float) -> ValueAndGrad:
    # KL(q‖p) = Σ q (log q − log p), as F.kl_div computes it; gradient p − q
    q = log_q.exp()
    values = log_q.sub_(log_p).mul_(q).sum(dim=-1)
    return values, log_p.exp_().sub_(q)


def _rkl(log_p: Tensor, log_q: Tensor, **_: float) -> ValueAndGrad:
    # KL(p‖q) = Σc, c = p (log p − log q); a = log p − log q + 1 (the 1 cancels in c − p Σc)
    p = log_p.exp()
    c = log_q.neg_().add_(log_p).mul_(p)
    values = c.sum(dim=-1)
    return values, _softmax_backward(p, c, values)


def _tvd(log_p: Tensor, log_q: Tensor, **_: float) -> ValueAndGrad:
    # 0.5 Σ|q − p|; a = −0.5 sign(q − p), 0 at ties as for autograd's abs
    p, q = log_p.exp_(), log_q.exp_()
    diff = q.sub_(p)
    values = 0.5 * diff.abs().sum(dim=-1)
    return values, _softmax_backward(p, diff.sign_().mul_(p).mul_(-0.5))


def _jsd(log_p: Tensor, log_q: Tensor, *, beta: float = 0.5, **_: float) -> ValueAndGrad:
    # β KL(q‖m) + (1 − β) KL(p‖m), m = βq + (1 − β)p; a = (1 − β) log(p / m)
    if beta in (0.0, 1.0):  # m is p or q: the value is 0 (as divergence computes it)
        return _identically_zero("jsd", log_p, log_q, beta=beta)
    log_m = _log_mix(log_q, log_p, beta)
    q = log_q.exp()
    kl_q = log_q.sub_(log_m).mul_(q).sum(dim=-1)
    del q
    c = log_m.neg_().add_(log_p)  # log p − log m
    p = log_p.exp_()
    kl_p = c.mul_(p).sum(dim=-1)
    values = beta * kl_q + (1.0 - beta) * kl_p
    return values, _softmax_backward(p, c, kl_p).mul_(1.0 - beta)


def _skl(log_p: Tensor, log_q: Tensor, *, skew: float = 0.1, **_: float) -> ValueAndGrad:
    # KL(q‖m), m = αq + (1 − α)p; a = −(1 − α) q / m, so c = −(1 − α) exp(log p + log q − log m)
    if skew == 0.0:  # m = p
        return _fkl(log_p, log_q)
    if skew == 1.0:  # m = q
        return _identically_zero("skl", log_p, log_q, skew=skew)
    ratio = _log_mix(log_q, log_p, skew).neg_().add_(log_q)  # log q − log m
    values = log_q.exp_().mul_(ratio).sum(dim=-1)
    c = ratio.add_(log_p).exp_().mul_(-(1.0 - skew))
    return values, _softmax_backward(log_p.exp_(), c)


def _srkl(log_p: Tensor, log_q: Tensor, *, skew: float = 0.1, **_: float) -> ValueAndGrad:
    # KL(p‖m), m = αp + (1 − α)q; a = log(p / m) + 1 − α p / m (the 1 cancels), so
    # c = p (log p − log m) − α exp(2 log p − log m)
    if skew == 0.0:  # m = q
        return _rkl(log_p, log_q)
    if skew == 1.0:  # m = p
        return _identically_zero("srkl", log_p, log_q, skew=skew)
    ratio = _log_mix(log_p, log_q, skew).neg_().add_(log_p)  # log p − log m
    second = torch.add(ratio, log_p, out=log_q).exp_().mul_(skew)  # α p² / m
    p = log_p.exp_()
    c = ratio.mul_(p)
    values = c.sum(dim=-1)
    return values, _softmax_backward(p, c.sub_(second))


def _identically_zero(kind: str, log_p: Tensor, log_q: Tensor, **opts: float) -> ValueAndGrad:
    """A mixture weight at an end makes the kind 0 whatever the student: the value as
    ``divergence`` computes it, and a zero gradient."""
    return _divergence_fn(kind)(log_p, log_q, **opts), log_p.zero_()


_VALUE_AND_GRAD: dict[str, Callable[..., ValueAndGrad]] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "tvd": _tvd,
    "jsd": _jsd,
    "skl": _skl,
    "srkl": _srkl,
}
"""Kind → ``(log_p, log_q, beta=, skew=) -> (values, ∂ values / ∂ s)`` for all kinds but
"mse" (values ``Σ (s − t)²``, gradient ``2 (s − t)``); the arguments are overwritten."""


def _dense_chunk(
    student: Tensor,
    teacher: Tensor,
    grad_out: Tensor | None,
    grad_scale: float | Tensor,
    *,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
) -> Tensor:
    """Per-position values of ``divergence`` on rows of logits, in the compute dtype; if
    ``grad_out`` is given, ``grad_scale`` times the gradient of their sum w.r.t. the student
    logits is written into it.

    Without a gradient this is ``divergence``'s own ``_per_position``; with one, the values and
    the closed-form gradient come out of one pass (see ``_VALUE_AND_GRAD``), checked against
    ``divergence`` and its autograd gradient in the tests.
    """
    if grad_out is None:
        return _per_position(student, teacher, kind, temperature=temperature, beta=beta, skew=skew)
    dtype = _compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    if temperature != 1.0:  # x / 1.0 == x: skip a pass
        s, t = s / temperature, t / temperature
    if kind in _ON_LOGITS:  # "mse": squared error of the scaled logits
        diff = s - t
        del s, t
        values = diff.square().sum(dim=-1)
        torch.mul(diff, grad_scale * (2.0 / temperature), out=grad_out)
        return values
    log_p, log_q = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    del s, t
    lowest = torch.finfo(dtype).min
    values, grad = _VALUE_AND_GRAD[kind](
        log_p.clamp_min_(lowest), log_q.clamp_min_(lowest), beta=beta, skew=skew
    )
    torch.mul(grad, grad_scale / temperature, out=grad_out)
    return values


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
    scale = _mean_scale(denominator, dtype)
    for start in range(0, student.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        chunk_mask = None if mask is None else mask[rows]
        chunk_grad = None if grad is None else grad[rows]
        values = chunk_fn(student[rows], *(t[rows] for t in targets), chunk_grad, scale)
        total = total + _chunk_total(values, chunk_mask)
        if chunk_grad is not None:
            _zero_unmasked(chunk_grad, chunk_mask)
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
        _save_inputs(ctx, student, mask, *targets)
        ctx.options = (denominator, chunk_fn, chunk_size, dtype)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None  # hand the buffer over: no copy, no second reference
        denominator, chunk_fn, chunk_size, dtype = ctx.options
        if grad is None:  # second backward through a retained graph: compute it again
            _no_second_backward(ctx)
            student, mask, *targets = ctx.saved_tensors
            _, grad = _chunked_mean(
                chunk_fn, student, tuple(targets), mask, denominator, chunk_size, dtype, True
            )
        if not _is_one(grad_output):
            grad.mul_(grad_output)
        return (grad, *(None,) * (len(ctx.needs_input_grad) - 1))


def _chunked_loss(
    chunk_fn: ChunkFn,
    student: Tensor,
    targets: tuple[Tensor, ...],
    mask: Tensor | None,
    chunk_size: int,
    dtype: torch.dtype,
) -> Tensor:
    """The masked mean of ``chunk_fn`` over the rows of ``student`` ``(N, V)``: through
    :class:`_ChunkedMean` when a gradient is needed, as a plain forward loop otherwise."""
    flat_mask, denominator = _flat_mask(mask, student.shape[0], student.device)
    if torch.is_grad_enabled() and student.requires_grad:
        return _ChunkedMean.apply(
            student, flat_mask, denominator, chunk_fn, chunk_size, dtype, *targets
        )
    with torch.no_grad():
        value, _ = _chunked_mean(
            chunk_fn, student, targets, flat_mask, denominator, chunk_size, dtype, False
        )
    return value


def _validate(
    kind: str, temperature: float, chunk_size: int | None, beta: float, skew: float
) -> None:
    """The checks of ``divergence``, once before the chunks: beta and skew only for the kinds
    that use them."""
    _divergence_fn(kind)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if kind in ("skl", "srkl"):
        _check_skew(skew)
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
    _validate(kind, temperature, chunk_size, beta, skew)
    _check_logits(student_logits, teacher_logits, temperature)
    _check_mask(mask, student_logits.shape)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    chunk_fn = functools.partial(
        _dense_chunk, kind=kind, temperature=temperature, beta=beta, skew=skew
    )
    dtype = _compute_dtype(student, teacher)
    return _chunked_loss(chunk_fn, student, (teacher,), mask, chunk_size, dtype)


# --- fused with the output layer ---


def _fused_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: Tensor,
    mask: Tensor | None,
    denominator: int | Tensor,
    chunk_fn: ChunkFn,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """``(masked mean, (grad hidden, grad weight, grad bias))`` of the divergence between
    ``F.linear(hidden, weight, bias)`` and ``teacher``, building the logits one chunk at a time.

    A gradient is computed for each of ``needs`` (hidden, weight, bias) that is true. The weight
    and bias gradients sum over every chunk: they are accumulated, and returned, in at least
    float32 so half-precision weights do not lose the small per-chunk contributions.

    Under ``torch.autocast`` the products run in the autocast dtype (the weight is cast once,
    not once per chunk), as ``F.linear`` and its backward would; the gradients come back in
    the inputs' own dtypes.
    """
    need_hidden, need_weight, need_bias = needs
    need_bias = need_bias and bias is not None
    need_logits = need_hidden or need_weight or need_bias
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_weight else None
    grad_bias = torch.zeros_like(bias, dtype=acc_dtype) if need_bias else None
    total = hidden.new_zeros((), dtype=_compute_dtype(hidden, weight, teacher))
    scale = _mean_scale(denominator, total.dtype)
    device = hidden.device.type
    low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if low is not None:  # products in the autocast dtype: the weight cast once, not per chunk
        weight, bias = weight.to(low), None if bias is None else bias.to(low)
    with torch.autocast(device, enabled=False) if low else contextlib.nullcontext():
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk_mask = None if mask is None else mask[rows]
            h = hidden[rows] if low is None else hidden[rows].to(low)
            logits = F.linear(h, weight, bias)
            # the gradient w.r.t. this chunk's logits, in their dtype as autograd would give it
            grad_logits = torch.empty_like(logits) if need_logits else None
            values = chunk_fn(logits, teacher[rows], grad_logits, scale)
            del logits
            total = total + _chunk_total(values, chunk_mask)
            if grad_logits is None:
                continue
            _zero_unmasked(grad_logits, chunk_mask)
            # the linear layer's backward: three matmuls
            if grad_hidden is not None:
                if grad_hidden.dtype == grad_logits.dtype:
                    torch.matmul(grad_logits, weight, out=grad_hidden[rows])
                else:  # products in a lower precision (autocast)
                    grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                if grad_logits.dtype == acc_dtype:  # no (V, H) temporary
                    grad_weight.addmm_(grad_logits.T, h)
                else:
                    grad_weight += (grad_logits.T @ h).to(acc_dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0).to(acc_dtype)
    return total / denominator, (grad_hidden, grad_weight, grad_bias)


class _FusedLinearDivergence(torch.autograd.Function):
    """Mean divergence between ``F.linear(hidden, weight, bias)`` and teacher logits, by chunks,
    with the gradients of hidden, weight and bias computed in forward.

    The student's logits exist for one chunk at a time.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        teacher: Tensor,
        mask: Tensor | None,
        denominator: int | Tensor,
        chunk_fn: ChunkFn,
        chunk_size: int,
    ) -> Tensor:
        needs = (
            hidden.requires_grad,
            weight.requires_grad,
            bias is not None and bias.requires_grad,
        )
        options = (denominator, chunk_fn, chunk_size, needs)
        value, ctx.grads = _fused_pass(hidden, weight, bias, teacher, mask, *options)
        # the inputs, only for a second backward through a retained graph
        _save_inputs(ctx, hidden, weight, bias, teacher, mask)
        ctx.options = options
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None  # hand the buffers over
        if grads is None:  # second backward through a retained graph: compute them again
            _no_second_backward(ctx)
            _, grads = _fused_pass(*ctx.saved_tensors, *ctx.options)
        scale = not _is_one(grad_output)
        grad_hidden, grad_weight, grad_bias = (
            g.mul_(grad_output) if g is not None and scale else g for g in grads
        )
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def fused_linear_divergence(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``divergence(F.linear(hidden, weight, bias), teacher_logits, kind, ...)`` without ever
    materialising the student's logits.

    ``hidden`` is the student's last hidden state ``(..., H)``, ``weight`` its output (LM head)
    matrix ``(V, H)``, ``bias`` an optional ``(V,)``, ``teacher_logits`` ``(..., V)``. The
    student logits are built ``chunk_size`` rows at a time (``None``: :func:`default_chunk_size`
    of V). When a gradient is needed, forward
    computes each chunk's value and gradients in the same pass and keeps only the gradients of
    ``hidden`` ``(N × H)``, ``weight`` and ``bias`` (the weight and bias gradients accumulated
    over chunks in at least float32); backward scales them by the incoming gradient and
    recomputes nothing (a second backward through a retained graph recomputes them; double
    backward is not supported). Under ``torch.no_grad()`` only the value is computed. The
    teacher gets no gradient. ``hidden``, ``weight`` and ``bias`` must share a dtype, as for
    ``F.linear``. Arguments, kinds, masking, the value and the gradients are those of
    :func:`~potstill.losses.divergences.divergence`.
    """
    _validate(kind, temperature, chunk_size, beta, skew)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (..., H) and weight (V, H) do not fit: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    logits_shape = (*hidden.shape[:-1], weight.shape[0])
    if tuple(teacher_logits.shape) != logits_shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} must have the student logits' shape "
            f"{logits_shape} (hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_mask(mask, torch.Size(logits_shape))
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, weight.shape[0])
    flat_mask, denominator = _flat_mask(mask, flat_hidden.shape[0], hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    chunk_fn = functools.partial(
        _dense_chunk, kind=kind, temperature=temperature, beta=beta, skew=skew
    )
    leaves = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
        return _FusedLinearDivergence.apply(
            flat_hidden, weight, bias, teacher, flat_mask, denominator, chunk_fn, chunk_size
        )
    with torch.no_grad():
        value, _ = _fused_pass(
            flat_hidden,
            weight,
            bias,
            teacher,
            flat_mask,
            denominator,
            chunk_fn,
            chunk_size,
            (False, False, False),
        )
    return value


# --- sparse (top-k) teacher targets ---


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
        logits = teacher_logits.detach().to(_compute_dtype(teacher_logits))
        logprobs, ids = F.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
        tail_mass = (1.0 - logprobs.exp().sum(dim=-1)).clamp_min(0.0)
        if k == vocab:
            # nothing is left outside the top-k; 1 − Σ would only keep rounding error, which
            # against the student's exactly-empty tail gives a huge spurious KL term
            tail_mass = torch.zeros_like(tail_mass)
        return cls(ids=ids, logprobs=logprobs, tail_mass=tail_mass)


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
    dtype = _compute_dtype(student_logits, logprobs, tail_mass)
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
    return _divergence_fn(kind)(student, teacher, beta=beta, skew=skew)


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
    dtype = _compute_dtype(student, logprobs, tail_mass)
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
    _validate(kind, temperature, chunk_size, beta, skew)
    if student_logits.dim() < 1 or topk.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k leading dims {tuple(topk.ids.shape[:-1])} must equal the student logits' "
            f"leading dims (student logits {tuple(student_logits.shape)})"
        )
    if topk.k > student_logits.shape[-1]:
        raise ValueError(f"k={topk.k} exceeds the vocabulary V={student_logits.shape[-1]}")
    _check_mask(mask, student_logits.shape)
    opts = {"kind": kind, "temperature": temperature, "beta": beta, "skew": skew}

    if chunk_size is not None:
        vocab, k = student_logits.shape[-1], topk.k
        targets = (
            topk.ids.reshape(-1, k),
            topk.logprobs.detach().reshape(-1, k),
            topk.tail_mass.detach().reshape(-1),
        )
        dtype = _compute_dtype(student_logits, topk.logprobs, topk.tail_mass)
        chunk_fn = functools.partial(_sparse_chunk, **opts)
        student = student_logits.reshape(-1, vocab)
        return _chunked_loss(chunk_fn, student, targets, mask, chunk_size, dtype)

    per_position = _sparse_per_position(
        student_logits, topk.ids, topk.logprobs, topk.tail_mass, **opts
    )
    if mask is None:
        return per_position.mean() if per_position.numel() else per_position.sum()
    total = torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
    return total / mask.sum().clamp_min(1)
