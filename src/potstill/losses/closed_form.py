"""Values and closed-form gradients of the dense divergences in one pass, per chunk of rows:
the second form of each formula of :mod:`.divergences`, used by the chunked and fused losses
(checked against ``divergence`` and its autograd gradient in the tests)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .divergences import ON_LOGITS, compute_dtype, divergence_fn, per_position

# Each takes the student's and teacher's log-softmax of the scaled logits, ``log_p`` and
# ``log_q`` (clamped at the lowest finite value, as ``divergence``'s KL does), and returns the
# per-position values of the kind, computed as ``divergence`` does, and their gradient w.r.t.
# the scaled student logits ``s``. They work in place in their arguments, which dense_chunk no
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
    return divergence_fn(kind)(log_p, log_q, **opts), log_p.zero_()


VALUE_AND_GRAD: dict[str, Callable[..., ValueAndGrad]] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "tvd": _tvd,
    "jsd": _jsd,
    "skl": _skl,
    "srkl": _srkl,
}
"""Kind → ``(log_p, log_q, beta=, skew=) -> (values, ∂ values / ∂ s)`` for all kinds but
"mse" (values ``Σ (s − t)²``, gradient ``2 (s − t)``); the arguments are overwritten."""


def dense_chunk(
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

    Without a gradient this is ``divergence``'s own ``per_position``; with one, the values and
    the closed-form gradient come out of one pass (see ``VALUE_AND_GRAD``), checked against
    ``divergence`` and its autograd gradient in the tests.
    """
    if grad_out is None:
        return per_position(student, teacher, kind, temperature=temperature, beta=beta, skew=skew)
    dtype = compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    if temperature != 1.0:  # x / 1.0 == x: skip a pass
        s, t = s / temperature, t / temperature
    if kind in ON_LOGITS:  # "mse": squared error of the scaled logits
        diff = s - t
        del s, t
        values = diff.square().sum(dim=-1)
        torch.mul(diff, grad_scale * (2.0 / temperature), out=grad_out)
        return values
    log_p, log_q = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    del s, t
    lowest = torch.finfo(dtype).min
    values, grad = VALUE_AND_GRAD[kind](
        log_p.clamp_min_(lowest), log_q.clamp_min_(lowest), beta=beta, skew=skew
    )
    torch.mul(grad, grad_scale / temperature, out=grad_out)
    return values
