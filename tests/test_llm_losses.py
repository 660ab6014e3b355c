"""Tests for the skew KL kinds and the chunked, fused and sparse divergences (potstill.losses)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randn as _randn
from conftest import random_mask as _random_mask

from potstill.losses import chunked, closed_form
from potstill.losses.chunked import chunked_divergence
from potstill.losses.divergences import SKEW_DIVERGENCES, divergence
from potstill.losses.fused import fused_linear_divergence
from potstill.losses.sparse import sparse_divergence
from potstill.signal import TopK

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_KINDS = ["fkl", "rkl", "jsd", "tvd", "mse", "skl", "srkl"]
DISTRIBUTION_KINDS = [k for k in ALL_KINDS if k != "mse"]


# --- naive references, one position at a time ---


def _tempered(probs: list[float], temperature: float) -> list[float]:
    """Normalised ``p_i^(1/T)``; a zero bucket stays zero."""
    powered = [p ** (1.0 / temperature) if p > 0 else 0.0 for p in probs]
    total = sum(powered)
    return [p / total for p in powered]


def _ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _mix(a: list[float], b: list[float], w: float) -> list[float]:
    return [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]


def _ref_on_probs(ps: list[float], pt: list[float], kind: str, beta: float, skew: float) -> float:
    if kind == "fkl":
        return _ref_kl(pt, ps)
    if kind == "rkl":
        return _ref_kl(ps, pt)
    if kind == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps, strict=True))
    if kind == "skl":
        return _ref_kl(pt, _mix(pt, ps, skew))
    if kind == "srkl":
        return _ref_kl(ps, _mix(ps, pt, skew))
    m = _mix(pt, ps, beta)
    return beta * _ref_kl(pt, m) + (1 - beta) * _ref_kl(ps, m)


def _softmax(row: list[float], temperature: float) -> list[float]:
    top = max(row)
    exps = [math.exp((x - top) / temperature) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _mean_over(values: list[float], mask) -> float:
    keep = [True] * len(values) if mask is None else mask.reshape(-1).tolist()
    kept = [v for v, k in zip(values, keep, strict=True) if k]
    return sum(kept) / len(kept) if kept else 0.0


def _ref_dense(student, teacher, kind, temperature=1.0, beta=0.5, skew=0.1, mask=None) -> float:
    vocab = student.shape[-1]
    values = [
        _ref_on_probs(_softmax(s, temperature), _softmax(t, temperature), kind, beta, skew)
        for s, t in zip(
            student.reshape(-1, vocab).tolist(), teacher.reshape(-1, vocab).tolist(), strict=True
        )
    ]
    return _mean_over(values, mask)


def _ref_sparse(student, ids, teacher_logprobs, kind, temperature, beta=0.5, skew=0.1, mask=None):
    """Straight from the bucket formula: k top tokens plus the tail, then tempered buckets."""
    vocab, k = student.shape[-1], ids.shape[-1]
    values = []
    for s, row_ids, lps in zip(
        student.reshape(-1, vocab).tolist(),
        ids.reshape(-1, k).tolist(),
        teacher_logprobs.reshape(-1, k).tolist(),
        strict=True,
    ):
        ps_full = _softmax(s, 1.0)
        ps = [ps_full[i] for i in row_ids]
        ps.append(sum(p for i, p in enumerate(ps_full) if i not in set(row_ids)))
        pt = [math.exp(lp) for lp in lps]
        pt.append(max(1.0 - sum(pt), 0.0))
        values.append(
            _ref_on_probs(_tempered(ps, temperature), _tempered(pt, temperature), kind, beta, skew)
        )
    return _mean_over(values, mask)


# --- skew KL kinds in divergence ---


def test_skew_kinds_are_registered():
    assert set(SKEW_DIVERGENCES) == {"skl", "srkl"}
    with pytest.raises(ValueError, match="skl.*srkl"):
        divergence(torch.zeros(2, 3), torch.zeros(2, 3), "nope")


@pytest.mark.parametrize("kind", ["skl", "srkl"])
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("skew", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("use_mask", [False, True])
def test_skew_kl_matches_naive_reference(kind, shape, temperature, skew, use_mask):
    student, teacher = _randn(*shape, seed=1), _randn(*shape, seed=2)
    mask = _random_mask(shape[:-1], seed=3) if use_mask else None
    got = divergence(student, teacher, kind, temperature=temperature, skew=skew, mask=mask)
    want = _ref_dense(student, teacher, kind, temperature, skew=skew, mask=mask)
    assert got.item() == pytest.approx(want, abs=1e-12, rel=1e-10)


@pytest.mark.parametrize(("kind", "plain"), [("skl", "fkl"), ("srkl", "rkl")])
def test_skew_endpoints(kind, plain):
    student, teacher = _randn(4, 6, seed=4), _randn(4, 6, seed=5)
    at_zero = divergence(student, teacher, kind, skew=0.0)
    assert at_zero.item() == pytest.approx(divergence(student, teacher, plain).item(), abs=1e-12)
    assert divergence(student, teacher, kind, skew=1.0).item() == 0.0


def test_skew_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError, match="skew"):
        divergence(torch.zeros(2, 3), torch.zeros(2, 3), "skl", skew=1.5)


@pytest.mark.parametrize("kind", ["skl", "srkl"])
def test_skew_kl_gradcheck(kind):
    student = _randn(2, 3, 4, seed=6).requires_grad_()
    teacher = _randn(2, 3, 4, seed=7).requires_grad_()
    mask = _random_mask((2, 3), seed=8)

    def fn(s, t):
        return divergence(s, t, kind, temperature=1.7, skew=0.3, mask=mask)

    assert torch.autograd.gradcheck(fn, (student, teacher))


@pytest.mark.parametrize("kind", ["skl", "srkl"])
def test_skew_kl_large_logits_finite(kind):
    generator = torch.Generator().manual_seed(9)
    student = ((torch.rand(4, 16, generator=generator) * 2 - 1) * 1e4).requires_grad_()
    teacher = (torch.rand(4, 16, generator=generator) * 2 - 1) * 1e4
    value = divergence(student, teacher, kind, temperature=0.5)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


# --- chunked_divergence ---


def _value_and_grad(fn, student):
    student = student.detach().clone().requires_grad_()
    value = fn(student)
    (grad,) = torch.autograd.grad(value, student)
    return value.detach(), grad


def _assert_same_value_and_grad(got_fn, want_fn, student):
    """``got_fn`` and ``want_fn`` give the same value and student gradient (to 1e-6 in float64,
    1e-5 otherwise), the value in the same dtype and the gradient in the student's."""
    want, want_grad = _value_and_grad(want_fn, student)
    got, got_grad = _value_and_grad(got_fn, student)
    tol = 1e-6 if student.dtype == torch.float64 else 1e-5
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert got_grad.dtype == student.dtype
    torch.testing.assert_close(got_grad, want_grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(13, 11), (2, 5, 9)])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
@pytest.mark.parametrize("use_mask", [False, True])
def test_chunked_equals_unchunked(kind, dtype, shape, chunk_size, use_mask):
    student = _randn(*shape, seed=10, dtype=dtype)
    teacher = _randn(*shape, seed=11, dtype=dtype)
    mask = _random_mask(shape[:-1], seed=12) if use_mask else None
    opts = {"temperature": 1.7, "beta": 0.3, "skew": 0.2, "mask": mask}
    _assert_same_value_and_grad(
        lambda s: chunked_divergence(s, teacher, kind, chunk_size=chunk_size, **opts),
        lambda s: divergence(s, teacher, kind, **opts),
        student,
    )


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_chunked_empty_mask_is_zero_with_zero_grad(kind):
    student = _randn(2, 3, 5, seed=13).requires_grad_()
    teacher = _randn(2, 3, 5, seed=14)
    value = chunked_divergence(
        student, teacher, kind, mask=torch.zeros(2, 3, dtype=torch.bool), chunk_size=2
    )
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("kind", ["fkl", "jsd", "srkl"])
def test_chunked_gradcheck_and_teacher_gets_no_gradient(kind):
    student = _randn(7, 4, seed=15).requires_grad_()
    teacher = _randn(7, 4, seed=16).requires_grad_()
    mask = _random_mask((7,), seed=17)
    assert torch.autograd.gradcheck(
        lambda s: chunked_divergence(s, teacher, kind, mask=mask, chunk_size=3), (student,)
    )
    chunked_divergence(student, teacher, kind, chunk_size=3).backward()
    assert teacher.grad is None


def test_chunked_half_precision_matches_divergence():
    student = _randn(6, 10, seed=18, dtype=torch.bfloat16).requires_grad_()
    teacher = _randn(6, 10, seed=19, dtype=torch.bfloat16)
    got = chunked_divergence(student, teacher, "fkl", chunk_size=4)
    want = divergence(student, teacher, "fkl")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    got.backward()
    assert student.grad.dtype == torch.bfloat16


def test_chunked_validates_arguments():
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown divergence kind"):
        chunked_divergence(s, s, "nope")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(s, s, "fkl", chunk_size=0)
    with pytest.raises(ValueError, match="mask shape"):
        chunked_divergence(s, s, "fkl", mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        chunked_divergence(s, torch.zeros(2, 4), "fkl")


# --- fused_linear_divergence ---


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [3, 64])
@pytest.mark.parametrize("use_mask", [False, True])
def test_fused_equals_divergence_of_linear(kind, use_bias, chunk_size, use_mask):
    hidden = _randn(2, 5, 6, seed=20, scale=1.0)
    weight = _randn(9, 6, seed=21, scale=0.5)
    bias = _randn(9, seed=22, scale=0.5) if use_bias else None
    teacher = _randn(2, 5, 9, seed=23)
    mask = _random_mask((2, 5), seed=24) if use_mask else None
    opts = {"temperature": 1.5, "beta": 0.3, "skew": 0.2, "mask": mask}
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    if use_bias:
        leaves.append(bias.clone().requires_grad_())

    def unfused(h, w, b=None):
        return divergence(F.linear(h, w, b), teacher, kind, **opts)

    def fused(h, w, b=None):
        return fused_linear_divergence(h, w, teacher, kind, bias=b, chunk_size=chunk_size, **opts)

    want = unfused(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    got = fused(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_fused_gradcheck():
    hidden = _randn(5, 3, seed=25, scale=1.0).requires_grad_()
    weight = _randn(4, 3, seed=26, scale=0.5).requires_grad_()
    bias = _randn(4, seed=27, scale=0.5).requires_grad_()
    teacher = _randn(5, 4, seed=28)
    mask = _random_mask((5,), seed=29)

    def fn(h, w, b):
        return fused_linear_divergence(h, w, teacher, "skl", bias=b, mask=mask, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_fused_empty_mask_is_zero_with_zero_grads():
    hidden = _randn(4, 3, seed=30).requires_grad_()
    weight = _randn(5, 3, seed=31).requires_grad_()
    value = fused_linear_divergence(
        hidden, weight, _randn(4, 5, seed=32), "fkl", mask=torch.zeros(4, dtype=torch.bool)
    )
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_fused_float32_matches():
    hidden = _randn(33, 8, seed=33, scale=1.0, dtype=torch.float32).requires_grad_()
    weight = _randn(40, 8, seed=34, scale=0.5, dtype=torch.float32).requires_grad_()
    teacher = _randn(33, 40, seed=35, dtype=torch.float32)
    want = divergence(hidden @ weight.T, teacher, "jsd")
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got = fused_linear_divergence(hidden, weight, teacher, "jsd", chunk_size=10)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_fused_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        fused_linear_divergence(torch.zeros(2, 3), torch.zeros(5, 4), torch.zeros(2, 5), "fkl")
    with pytest.raises(ValueError, match="teacher logits"):
        fused_linear_divergence(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, 4), "fkl")


# --- sparse top-k targets ---


def test_topk_from_logits():
    logits = _randn(2, 3, 8, seed=40)
    topk = TopK.from_logits(logits, 3)
    log_p = F.log_softmax(logits, dim=-1)
    assert topk.ids.shape == (2, 3, 3) and topk.tail_mass.shape == (2, 3)
    torch.testing.assert_close(topk.logprobs, log_p.gather(-1, topk.ids))
    torch.testing.assert_close(topk.tail_mass, 1 - topk.logprobs.exp().sum(-1))
    assert (topk.logprobs[..., :-1] >= topk.logprobs[..., 1:]).all()
    full = TopK.from_logits(logits, 8)
    assert (full.tail_mass >= 0).all() and full.tail_mass.max() < 1e-12


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("use_mask", [False, True])
def test_sparse_with_k_equal_v_is_dense(kind, temperature, use_mask):
    student = _randn(2, 4, 7, seed=41).requires_grad_()
    teacher = _randn(2, 4, 7, seed=42)
    mask = _random_mask((2, 4), seed=43) if use_mask else None
    opts = {"temperature": temperature, "beta": 0.3, "skew": 0.2, "mask": mask}
    got = sparse_divergence(student, TopK.from_logits(teacher, 7), kind, **opts)
    want = divergence(student, teacher, kind, **opts)
    assert got.item() == pytest.approx(want.item(), abs=1e-8)
    (got_grad,) = torch.autograd.grad(got, student)
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("use_mask", [False, True])
def test_sparse_matches_bucket_reference(kind, k, temperature, use_mask):
    student, teacher = _randn(3, 4, 6, seed=44), _randn(3, 4, 6, seed=45)
    mask = _random_mask((3, 4), seed=46) if use_mask else None
    topk = TopK.from_logits(teacher, k)
    got = sparse_divergence(
        student, topk, kind, temperature=temperature, beta=0.3, skew=0.2, mask=mask
    )
    want = _ref_sparse(student, topk.ids, topk.logprobs, kind, temperature, 0.3, 0.2, mask)
    assert got.item() == pytest.approx(want, abs=1e-10, rel=1e-9)


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
def test_sparse_gradcheck(kind):
    student = _randn(2, 3, 6, seed=47).requires_grad_()
    topk = TopK.from_logits(_randn(2, 3, 6, seed=48), 2)
    mask = _random_mask((2, 3), seed=49)

    def fn(s):
        return sparse_divergence(s, topk, kind, temperature=1.3, beta=0.3, skew=0.2, mask=mask)

    assert torch.autograd.gradcheck(fn, (student,))


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
def test_sparse_empty_mask_is_zero_with_zero_grad(kind):
    student = _randn(2, 3, 6, seed=50).requires_grad_()
    topk = TopK.from_logits(_randn(2, 3, 6, seed=51), 2)
    value = sparse_divergence(student, topk, kind, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_sparse_rejects_mse_and_bad_shapes():
    topk = TopK.from_logits(torch.zeros(2, 5), 2)
    with pytest.raises(ValueError, match="mse"):
        sparse_divergence(torch.zeros(2, 5), topk, "mse")
    with pytest.raises(ValueError, match="leading dims"):
        sparse_divergence(torch.zeros(3, 5), topk, "fkl")
    with pytest.raises(ValueError, match="k must"):
        TopK.from_logits(torch.zeros(2, 5), 6)


def test_chunked_checks_beta_and_skew_like_divergence():
    s, t = _randn(3, 4, seed=60), _randn(3, 4, seed=61)
    # divergence ignores beta for kinds that do not use it; so does the chunked version
    torch.testing.assert_close(
        chunked_divergence(s, t, "fkl", beta=2.0), divergence(s, t, "fkl", beta=2.0)
    )
    with pytest.raises(ValueError, match="skew"):
        chunked_divergence(s, t, "skl", skew=-0.1)
    with pytest.raises(ValueError, match="beta"):
        fused_linear_divergence(s, _randn(5, 4, seed=62), _randn(3, 5, seed=63), "jsd", beta=2.0)


def test_chunked_no_positions_gives_zero():
    student = torch.zeros(0, 5, requires_grad=True)
    value = chunked_divergence(student, torch.zeros(0, 5), "fkl")
    assert value.item() == 0.0
    value.backward()
    assert student.grad.shape == (0, 5)


# --- gradient computed in forward: no_grad, grad_output scaling, reuse of the graph ---


def _count_chunk_calls(monkeypatch) -> list[int]:
    """Count the calls of the dense per-chunk function (forward passes over a chunk)."""
    calls = []
    original = closed_form.dense_chunk

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(closed_form, "dense_chunk", counting)
    return calls


def test_chunked_backward_recomputes_nothing(monkeypatch):
    calls = _count_chunk_calls(monkeypatch)
    student = _randn(10, 7, seed=70).requires_grad_()
    value = chunked_divergence(student, _randn(10, 7, seed=71), "jsd", chunk_size=4)
    assert len(calls) == 3
    value.backward()
    assert len(calls) == 3  # backward only scaled the stored gradient
    hidden, weight = _randn(10, 3, seed=72).requires_grad_(), _randn(7, 3, seed=73)
    fused_linear_divergence(hidden, weight, _randn(10, 7, seed=74), "fkl", chunk_size=5).backward()
    assert len(calls) == 5


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_chunked_backward_hands_over_the_gradient_without_a_copy(monkeypatch, scale):
    buffers = []
    original = chunked._chunked_mean

    def recording(*args, **kwargs):
        value, grad = original(*args, **kwargs)
        buffers.append(grad)
        return value, grad

    monkeypatch.setattr(chunked, "_chunked_mean", recording)
    student = _randn(6, 9, seed=75).requires_grad_()
    (scale * chunked_divergence(student, _randn(6, 9, seed=76), "fkl", chunk_size=4)).backward()
    assert student.grad.data_ptr() == buffers[0].data_ptr()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_chunked_under_no_grad_gives_the_value_only(monkeypatch, kind):
    student = _randn(2, 5, 9, seed=77).requires_grad_()
    teacher = _randn(2, 5, 9, seed=78)
    mask = _random_mask((2, 5), seed=79)
    opts = {"temperature": 1.3, "beta": 0.3, "skew": 0.2, "mask": mask}
    want = divergence(student, teacher, kind, **opts).detach()
    computed_grads = []
    original = chunked._chunked_mean

    def recording(*args, **kwargs):
        value, grad = original(*args, **kwargs)
        computed_grads.append(grad)
        return value, grad

    monkeypatch.setattr(chunked, "_chunked_mean", recording)
    with torch.no_grad():
        got = chunked_divergence(student, teacher, kind, chunk_size=3, **opts)
    assert not got.requires_grad and got.grad_fn is None
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # nor when the student does not require grad
    got = chunked_divergence(student.detach(), teacher, kind, chunk_size=3, **opts)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert computed_grads == [None, None]


def test_fused_under_no_grad_gives_the_value_only():
    hidden = _randn(2, 5, 6, seed=80, scale=1.0).requires_grad_()
    weight = _randn(9, 6, seed=81, scale=0.5).requires_grad_()
    bias = _randn(9, seed=82, scale=0.5).requires_grad_()
    teacher = _randn(2, 5, 9, seed=83)
    mask = _random_mask((2, 5), seed=84)
    want = divergence(F.linear(hidden, weight, bias), teacher, "skl", mask=mask).detach()
    with torch.no_grad():
        got = fused_linear_divergence(
            hidden, weight, teacher, "skl", bias=bias, mask=mask, chunk_size=4
        )
    assert got.grad_fn is None
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _chunked(s, teacher, kind):
    return chunked_divergence(s, teacher, kind, temperature=1.4, chunk_size=3)


def _sparse_chunked(s, teacher, kind):
    topk = TopK.from_logits(teacher, 3)
    return sparse_divergence(s, topk, kind, temperature=1.4, chunk_size=3)


@pytest.mark.parametrize("loss_fn", [_chunked, _sparse_chunked])
@pytest.mark.parametrize("kind", ["fkl", "jsd", "srkl"])
def test_chunked_grad_output_scaling_and_reuse(loss_fn, kind):
    teacher = _randn(7, 6, seed=85)
    student = _randn(7, 6, seed=86).requires_grad_()
    (base,) = torch.autograd.grad(loss_fn(student, teacher, kind), student)

    def grad_of(combine):
        student.grad = None
        combine(loss_fn(student, teacher, kind)).backward()
        return student.grad

    torch.testing.assert_close(grad_of(lambda v: 3.0 * v), 3.0 * base)
    torch.testing.assert_close(grad_of(lambda v: -0.25 * v), -0.25 * base)
    torch.testing.assert_close(grad_of(lambda v: v * 2.0 + v * 0.5), 2.5 * base)  # used twice
    torch.testing.assert_close(grad_of(lambda v: v * 0.0), torch.zeros_like(base))
    value = loss_fn(student, teacher, kind).detach()
    torch.testing.assert_close(grad_of(lambda v: v.square()), 2 * value * base)

    # a retained graph: the second backward recomputes, the first result is left alone
    student.grad = None
    value = loss_fn(student, teacher, kind)
    (first,) = torch.autograd.grad(value, student, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(2.0 * value, student, retain_graph=True)
    value.backward(retain_graph=True)
    value.backward()
    assert torch.equal(first, kept)
    torch.testing.assert_close(first, base)
    torch.testing.assert_close(second, 2.0 * base)
    torch.testing.assert_close(student.grad, 2.0 * base)
    with pytest.raises(RuntimeError, match="second time"):
        value.backward()


def test_fused_grad_output_scaling_and_reuse():
    hidden = _randn(7, 3, seed=87, scale=1.0).requires_grad_()
    weight = _randn(5, 3, seed=88, scale=0.5).requires_grad_()
    bias = _randn(5, seed=89, scale=0.5).requires_grad_()
    teacher = _randn(7, 5, seed=90)
    leaves = (hidden, weight, bias)

    def loss():
        return fused_linear_divergence(hidden, weight, teacher, "rkl", bias=bias, chunk_size=3)

    base = torch.autograd.grad(loss(), leaves)
    scaled = torch.autograd.grad(loss() * 1.5 + loss() * 0.5 + 0 * loss(), leaves)
    for got, want in zip(scaled, base, strict=True):
        torch.testing.assert_close(got, 2.0 * want)
    value = loss()
    value.backward(retain_graph=True)
    value.backward(retain_graph=True)
    (-value).backward()
    for leaf, want in zip(leaves, base, strict=True):
        torch.testing.assert_close(leaf.grad, want)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "mse"])
def test_chunked_masked_out_rows_may_hold_non_finite_logits(kind):
    student = _randn(3, 5, seed=113)
    student[2, 1] = float("inf")
    teacher = _randn(3, 5, seed=114)
    mask = torch.tensor([True, True, False])
    want = divergence(student[:2], teacher[:2], kind)
    got, grad = _value_and_grad(
        lambda s: chunked_divergence(s, teacher, kind, mask=mask, chunk_size=2), student
    )
    torch.testing.assert_close(got, want)
    assert torch.equal(grad[2], torch.zeros(5, dtype=grad.dtype))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
def test_chunked_vocabulary_entries_at_minus_infinity_on_both_sides_are_absent(kind):
    """Padding rows of an output matrix give -inf logits to both models: the value and the
    gradient are those without these entries, and their gradient is 0 (divergence's autograd
    gives NaN there for the mixture kinds)."""
    student, teacher = _randn(5, 9, seed=119), _randn(5, 9, seed=120)
    student[:, -2:] = teacher[:, -2:] = float("-inf")
    opts = {"temperature": 1.3, "beta": 0.3, "skew": 0.2}
    want, want_grad = _value_and_grad(
        lambda s: divergence(s, teacher[:, :-2], kind, **opts), student[:, :-2]
    )
    got, got_grad = _value_and_grad(
        lambda s: chunked_divergence(s, teacher, kind, chunk_size=2, **opts), student
    )
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_grad[:, :-2], want_grad, atol=1e-12, rtol=1e-10)
    assert torch.equal(got_grad[:, -2:], torch.zeros(5, 2, dtype=got_grad.dtype))


def test_chunked_gradient_has_no_graph():
    """Double backward is not supported: even with create_graph the gradient is a constant."""
    student = _randn(4, 5, seed=91).requires_grad_()
    value = chunked_divergence(student, _randn(4, 5, seed=92), "fkl", chunk_size=2)
    (grad,) = torch.autograd.grad(value, student, create_graph=True)
    assert not grad.requires_grad


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("scale", "temperature"), [(1e4, 0.5), (1e4, 3.0), (30.0, 1.0)])
def test_chunked_closed_form_gradient_at_extremes(kind, mix, scale, temperature):
    """Mixture weights at their ends (beta for jsd, skew for skl/srkl) and huge logits."""
    student = _randn(6, 11, seed=93, scale=scale).requires_grad_()
    teacher = _randn(6, 11, seed=94, scale=scale)
    opts = {"temperature": temperature, "beta": mix, "skew": mix}
    want = divergence(student, teacher, kind, **opts)
    want_grad = (
        torch.autograd.grad(want, student)[0] if want.requires_grad else torch.zeros_like(student)
    )
    got, got_grad = _value_and_grad(
        lambda s: chunked_divergence(s, teacher, kind, chunk_size=4, **opts), student
    )
    torch.testing.assert_close(got, want.detach(), atol=1e-9, rtol=1e-9)
    assert torch.isfinite(got_grad).all()
    # absolute: with huge logits at T = 3 some gradients are ~1e-150, where autograd's and the
    # closed form's roundings differ relatively but not absolutely
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-6)


def test_fused_half_precision_matches_unfused():
    hidden = _randn(6, 4, seed=95, scale=1.0, dtype=torch.bfloat16).requires_grad_()
    weight = _randn(10, 4, seed=96, scale=0.5, dtype=torch.bfloat16).requires_grad_()
    bias = _randn(10, seed=97, scale=0.5, dtype=torch.bfloat16).requires_grad_()
    teacher = _randn(6, 10, seed=98, dtype=torch.bfloat16)
    want = divergence(F.linear(hidden, weight, bias), teacher, "fkl")
    want_grads = torch.autograd.grad(want, (hidden, weight, bias))
    got = fused_linear_divergence(hidden, weight, teacher, "fkl", bias=bias, chunk_size=4)
    got_grads = torch.autograd.grad(got, (hidden, weight, bias))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


# --- sparse_divergence by chunks ---


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(13, 11), (2, 5, 9)])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
@pytest.mark.parametrize("use_mask", [False, True])
def test_sparse_chunked_equals_unchunked(kind, dtype, shape, chunk_size, use_mask):
    student = _randn(*shape, seed=100, dtype=dtype)
    topk = TopK.from_logits(_randn(*shape, seed=101, dtype=dtype), 3)
    mask = _random_mask(shape[:-1], seed=102) if use_mask else None
    opts = {"temperature": 1.7, "beta": 0.3, "skew": 0.2, "mask": mask}
    _assert_same_value_and_grad(
        lambda s: sparse_divergence(s, topk, kind, chunk_size=chunk_size, **opts),
        lambda s: sparse_divergence(s, topk, kind, **opts),
        student,
    )


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
def test_sparse_chunked_with_k_equal_v_is_dense(kind):
    student = _randn(2, 4, 7, seed=103).requires_grad_()
    teacher = _randn(2, 4, 7, seed=104)
    mask = _random_mask((2, 4), seed=105)
    opts = {"temperature": 0.8, "beta": 0.3, "skew": 0.2, "mask": mask}
    got = sparse_divergence(student, TopK.from_logits(teacher, 7), kind, chunk_size=3, **opts)
    want = divergence(student, teacher, kind, **opts)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    (got_grad,) = torch.autograd.grad(got, student)
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("kind", ["fkl", "tvd", "skl"])
def test_sparse_chunked_gradcheck(kind):
    student = _randn(7, 6, seed=106).requires_grad_()
    topk = TopK.from_logits(_randn(7, 6, seed=107), 2)
    mask = _random_mask((7,), seed=108)

    def fn(s):
        return sparse_divergence(
            s, topk, kind, temperature=1.3, beta=0.3, skew=0.2, mask=mask, chunk_size=3
        )

    assert torch.autograd.gradcheck(fn, (student,))


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
def test_sparse_chunked_empty_mask_no_grad_and_no_positions(kind):
    student = _randn(2, 3, 6, seed=109).requires_grad_()
    topk = TopK.from_logits(_randn(2, 3, 6, seed=110), 2)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    value = sparse_divergence(student, topk, kind, mask=empty, chunk_size=2)
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    with torch.no_grad():
        got = sparse_divergence(student, topk, kind, chunk_size=4)
    assert got.grad_fn is None
    torch.testing.assert_close(got, sparse_divergence(student, topk, kind).detach())
    none = torch.zeros(0, 6, requires_grad=True)
    value = sparse_divergence(none, TopK.from_logits(torch.zeros(0, 6), 2), kind, chunk_size=2)
    assert value.item() == 0.0
    value.backward()
    assert none.grad.shape == (0, 6)


def test_sparse_chunked_half_precision_and_no_teacher_gradient():
    student = _randn(6, 10, seed=111, dtype=torch.bfloat16).requires_grad_()
    teacher = _randn(6, 10, seed=112, dtype=torch.bfloat16)
    topk = TopK.from_logits(teacher, 3)
    topk.logprobs.requires_grad_()
    got = sparse_divergence(student, topk, "fkl", chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sparse_divergence(student, topk, "fkl"))
    got.backward()
    assert student.grad.dtype == torch.bfloat16
    assert topk.logprobs.grad is None
    with pytest.raises(ValueError, match="chunk_size"):
        sparse_divergence(student, topk, "fkl", chunk_size=0)


def test_default_chunk_size_holds_a_fixed_number_of_logits(monkeypatch):
    assert chunked.default_chunk_size(49152) == chunked.DEFAULT_CHUNK_ELEMENTS // 49152 == 170
    assert chunked.default_chunk_size(2**30) == 1
    # the default in use: 24 logits per chunk, so 2 rows of 11 per chunk, 4 chunks for 7 rows
    monkeypatch.setattr(chunked, "DEFAULT_CHUNK_ELEMENTS", 24)
    calls = _count_chunk_calls(monkeypatch)
    student, teacher = _randn(7, 11, seed=115), _randn(7, 11, seed=116)
    want, want_grad = _value_and_grad(lambda s: divergence(s, teacher, "rkl"), student)
    got, got_grad = _value_and_grad(lambda s: chunked_divergence(s, teacher, "rkl"), student)
    assert len(calls) == 4
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-6)
    hidden, weight = _randn(7, 3, seed=117).requires_grad_(), _randn(11, 3, seed=118)
    fused_linear_divergence(hidden, weight, teacher, "fkl").backward()
    assert len(calls) == 8


@pytest.mark.parametrize("which", ["chunked", "fused", "sparse"])
def test_single_backward_keeps_no_inputs_and_refuses_a_second_backward(which):
    """Inside single_backward() the chunked, fused and sparse losses save nothing for a second
    backward (their logits can be freed after forward); the one backward is unchanged."""
    from potstill.losses.chunked import single_backward

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 4, generator=g).requires_grad_()
    weight = torch.randn(9, 4, generator=g)
    teacher = torch.randn(6, 9, generator=g)

    def build() -> torch.Tensor:
        if which == "fused":
            return fused_linear_divergence(hidden, weight, teacher, "fkl", chunk_size=4)
        student = hidden @ weight.T
        if which == "sparse":
            return sparse_divergence(student, TopK.from_logits(teacher, 3), "fkl", chunk_size=4)
        return chunked_divergence(student, teacher, "fkl", chunk_size=4)

    (want,) = torch.autograd.grad(build(), hidden)
    with single_backward():
        value = build()
    assert value.grad_fn is not None
    assert value.grad_fn.saved_tensors == ()  # nothing held for a recomputation
    value.backward(retain_graph=True)
    torch.testing.assert_close(hidden.grad, want)
    with pytest.raises(RuntimeError, match="single_backward"):
        value.backward()
    assert build().grad_fn.saved_tensors != ()  # outside, the inputs are kept as before


def test_fused_under_autocast_matches_linear_then_divergence():
    """Under torch.autocast (bf16) the fused head multiplies in bf16 like F.linear would; value
    and gradients match the unfused graph's to bf16 precision and come back in float32."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(12, 8, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(20, 8, generator=g)).requires_grad_()
    teacher = torch.randn(12, 20, generator=g)

    def run(fused: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                value = fused_linear_divergence(hidden, weight, teacher, "fkl", chunk_size=5)
            else:
                logits = torch.nn.functional.linear(hidden, weight)
                assert logits.dtype == torch.bfloat16
                value = chunked_divergence(logits, teacher, "fkl", chunk_size=5)
        return value, torch.autograd.grad(value, (hidden, weight))

    (a, (ha, wa)), (b, (hb, wb)) = run(True), run(False)
    assert ha.dtype == wa.dtype == torch.float32
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(ha, hb.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(wa, wb.float(), rtol=2e-2, atol=2e-3)
