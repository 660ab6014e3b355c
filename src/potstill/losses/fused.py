"""A divergence fused with the student's output layer: ``divergence(F.linear(hidden, weight,
bias), teacher_logits)`` one chunk of positions at a time, so the student's full logits never
exist (the chunk engine of :mod:`.chunked`, gradients computed in forward)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import closed_form
from .chunked import (
    ChunkFn,
    chunk_total,
    default_chunk_size,
    flatten_mask,
    is_one,
    mean_scale,
    no_second_backward,
    save_inputs,
    validate,
    zero_unmasked,
)
from .divergences import check_mask, compute_dtype

__all__ = ["fused_linear_divergence"]


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
    total = hidden.new_zeros((), dtype=compute_dtype(hidden, weight, teacher))
    scale = mean_scale(denominator, total.dtype)
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
            total = total + chunk_total(values, chunk_mask)
            if grad_logits is None:
                continue
            zero_unmasked(grad_logits, chunk_mask)
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
        save_inputs(ctx, hidden, weight, bias, teacher, mask)
        ctx.options = options
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None  # hand the buffers over
        if grads is None:  # second backward through a retained graph: compute them again
            no_second_backward(ctx)
            _, grads = _fused_pass(*ctx.saved_tensors, *ctx.options)
        scale = not is_one(grad_output)
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
    validate(kind, temperature, chunk_size, beta, skew)
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
    check_mask(mask, torch.Size(logits_shape))
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, weight.shape[0])
    flat_mask, denominator = flatten_mask(mask, flat_hidden.shape[0], hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    chunk_fn = functools.partial(
        closed_form.dense_chunk, kind=kind, temperature=temperature, beta=beta, skew=skew
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
