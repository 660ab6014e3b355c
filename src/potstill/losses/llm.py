"""Memory-lean divergences for LLM distillation: chunked, fused with the output layer, sparse.

With vocabularies of 50k–250k tokens, the ``(positions × V)`` float32 intermediates of
:func:`~potstill.losses.divergences.divergence` (scaled logits, log-probabilities, the pointwise
KL, their gradients) dominate training memory. The functions here give the same values as
``divergence`` while holding such intermediates for one chunk of positions at a time:

* :func:`chunked_divergence` takes dense student and teacher logits;
* :func:`fused_linear_divergence` takes the student's last hidden states and output weight, so
  the student's full logits never exist;
* :func:`sparse_divergence` takes a :class:`TopK` summary of the teacher (k ids, their
  log-probabilities and the tail mass) instead of dense teacher logits.

Both autograd functions store nothing but their inputs and recompute each chunk's forward in
backward (activation checkpointing at chunk granularity): the price is one extra forward pass
over the loss, the gain is that peak memory is the inputs plus a few ``chunk_size × V`` buffers
plus the gradients themselves.

The teacher never gets a gradient from the chunked and fused losses: teacher logits are targets
(pass them detached; a teacher tensor that requires grad gets ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .divergences import (
    _check_logits,
    _check_mask,
    _compute_dtype,
    _divergence_fn,
    _per_position,
)

__all__ = ["TopK", "chunked_divergence", "fused_linear_divergence", "sparse_divergence"]


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
    # where, not indexing: masked rows contribute exactly 0 to value and gradient
    return torch.where(mask, per_position, torch.zeros_like(per_position)).sum()


class _ChunkedDivergence(torch.autograd.Function):
    """Mean divergence over rows of ``(N, V)`` logits, one chunk of rows at a time.

    Saves only the inputs; backward recomputes every chunk's forward under ``enable_grad`` and
    writes that chunk's slice of the student gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        mask: Tensor | None,
        denominator: int | Tensor,
        opts: dict[str, Any],
        chunk_size: int,
    ) -> Tensor:
        total = student.new_zeros((), dtype=_compute_dtype(student, teacher))
        for start in range(0, student.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            per = _per_position(student[rows], teacher[rows], **opts)
            total = total + _chunk_total(per, None if mask is None else mask[rows])
        ctx.save_for_backward(student, teacher, mask)
        ctx.denominator, ctx.opts, ctx.chunk_size = denominator, opts, chunk_size
        return total / denominator

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        student, teacher, mask = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0]:
            # the one N×V buffer of backward: the gradient itself, in the student's dtype
            grad_student = torch.empty_like(student)
            scale = grad_output / ctx.denominator
            for start in range(0, student.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                with torch.enable_grad():
                    chunk = student[rows].detach().requires_grad_()
                    per = _per_position(chunk, teacher[rows], **ctx.opts)
                    total = _chunk_total(per, None if mask is None else mask[rows])
                    (grad_student[rows],) = torch.autograd.grad(total, chunk, scale)
        return grad_student, None, None, None, None, None


def _validate(kind: str, temperature: float, chunk_size: int) -> None:
    # beta and skew are checked by the kinds that use them, as in divergence()
    _divergence_fn(kind)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
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
    chunk_size: int = 1024,
) -> Tensor:
    """:func:`~potstill.losses.divergences.divergence`, computed ``chunk_size`` rows at a time.

    Same arguments, kinds and value as ``divergence`` (logits ``(..., V)``, optional bool
    ``mask`` of shape ``(...)``, mean over masked positions, 0 for an empty mask), but forward
    and backward each loop over chunks of the flattened positions, so float32 intermediates
    exist for one ``chunk_size × V`` chunk at a time. Only the inputs are saved for backward,
    which recomputes each chunk's forward; the only ``N × V`` tensor created is the student
    gradient (same dtype as ``student_logits``).

    The teacher receives no gradient (``None``): teacher logits are detached targets.
    Non-contiguous logits are copied once by the flattening ``reshape``.
    """
    _validate(kind, temperature, chunk_size)
    _check_logits(student_logits, teacher_logits, temperature)
    _check_mask(mask, student_logits.shape)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_mask, denominator = _flat_mask(mask, student.shape[0], student.device)
    opts = {"kind": kind, "temperature": temperature, "beta": beta, "skew": skew}
    return _ChunkedDivergence.apply(student, teacher, flat_mask, denominator, opts, chunk_size)


class _FusedLinearDivergence(torch.autograd.Function):
    """Mean divergence between ``F.linear(hidden, weight, bias)`` and teacher logits, by chunks.

    The student's logits exist for one chunk at a time, in forward and in backward.
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
        opts: dict[str, Any],
        chunk_size: int,
    ) -> Tensor:
        total = hidden.new_zeros((), dtype=_compute_dtype(hidden, weight, teacher))
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = F.linear(hidden[rows], weight, bias)
            per = _per_position(logits, teacher[rows], **opts)
            total = total + _chunk_total(per, None if mask is None else mask[rows])
        ctx.save_for_backward(hidden, weight, bias, teacher, mask)
        ctx.denominator, ctx.opts, ctx.chunk_size = denominator, opts, chunk_size
        return total / denominator

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, teacher, mask = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # Weight and bias gradients sum over every chunk: accumulate in at least float32 so
        # half-precision weights do not lose the small per-chunk contributions.
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_weight else None
        grad_bias = (
            torch.zeros_like(bias, dtype=acc_dtype) if need_bias and bias is not None else None
        )
        scale = grad_output / ctx.denominator
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]
            with torch.enable_grad():
                # The linear layer's backward is written out below (three matmuls), so
                # autograd only differentiates the divergence w.r.t. this chunk's logits.
                logits = F.linear(h, weight, bias).detach().requires_grad_()
                per = _per_position(logits, teacher[rows], **ctx.opts)
                total = _chunk_total(per, None if mask is None else mask[rows])
                (grad_logits,) = torch.autograd.grad(total, logits, scale)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).to(acc_dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0).to(acc_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
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
    chunk_size: int = 1024,
) -> Tensor:
    """``divergence(F.linear(hidden, weight, bias), teacher_logits, kind, ...)`` without ever
    materialising the student's logits.

    ``hidden`` is the student's last hidden state ``(..., H)``, ``weight`` its output (LM head)
    matrix ``(V, H)``, ``bias`` an optional ``(V,)``, ``teacher_logits`` ``(..., V)``. The
    student logits are built ``chunk_size`` rows at a time in forward and again in backward;
    only the inputs are saved. Gradients flow to ``hidden``, ``weight`` and ``bias`` (the weight
    and bias gradients are accumulated over chunks in at least float32); the teacher gets none.
    ``hidden``, ``weight`` and ``bias`` must share a dtype, as for ``F.linear``. Arguments,
    kinds, masking and the value are those of
    :func:`~potstill.losses.divergences.divergence`.
    """
    _validate(kind, temperature, chunk_size)
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
    opts = {"kind": kind, "temperature": temperature, "beta": beta, "skew": skew}
    return _FusedLinearDivergence.apply(
        flat_hidden, weight, bias, teacher, flat_mask, denominator, opts, chunk_size
    )


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


def _teacher_buckets(topk: TopK, dtype: torch.dtype, vocab: int) -> Tensor:
    """Teacher log-probabilities on the k+1 buckets; a zero tail becomes the lowest float."""
    lowest = torch.finfo(dtype).min
    tail_mass = topk.tail_mass.to(dtype)
    if topk.k == vocab:
        # The tail bucket is empty for the student too, so any stored tail is rounding error
        # (see TopK.from_logits); dropping it keeps k = V equal to the dense divergence.
        tail_mass = torch.zeros_like(tail_mass)
    tail = tail_mass.log().clamp_min(lowest).unsqueeze(-1)
    return torch.cat([topk.logprobs.to(dtype), tail], dim=-1)


def _temper(log_buckets: Tensor, temperature: float) -> Tensor:
    """``log_softmax(log_buckets / T)``, finite: ``lowest / T`` would overflow to -inf for T < 1
    and -inf gives NaN gradients in the mixture kinds."""
    scaled = (log_buckets / temperature).clamp_min(torch.finfo(log_buckets.dtype).min)
    return F.log_softmax(scaled, dim=-1)


def sparse_divergence(
    student_logits: Tensor,
    topk: TopK,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Tensor | None = None,
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
    Gradients flow to ``student_logits`` (and to ``topk.logprobs``/``tail_mass`` if they
    require grad; :meth:`TopK.from_logits` detaches them). ``"mse"`` raises ValueError: it
    compares raw logits, which top-k log-probabilities do not determine.
    """
    if kind == "mse":
        raise ValueError(
            "'mse' compares dense logits and cannot be computed from top-k log-probabilities; "
            "use divergence() or chunked_divergence() with the teacher's logits"
        )
    fn = _divergence_fn(kind)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.dim() < 1 or topk.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k leading dims {tuple(topk.ids.shape[:-1])} must equal the student logits' "
            f"leading dims (student logits {tuple(student_logits.shape)})"
        )
    if topk.k > student_logits.shape[-1]:
        raise ValueError(f"k={topk.k} exceeds the vocabulary V={student_logits.shape[-1]}")
    _check_mask(mask, student_logits.shape)

    dtype = _compute_dtype(student_logits, topk.logprobs, topk.tail_mass)
    student = _temper(_student_buckets(student_logits, topk.ids, dtype), temperature)
    teacher = _temper(_teacher_buckets(topk, dtype, student_logits.shape[-1]), temperature)
    per_position = fn(student, teacher, beta=beta, skew=skew)

    if mask is None:
        return per_position.mean() if per_position.numel() else per_position.sum()
    total = torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
    return total / mask.sum().clamp_min(1)
