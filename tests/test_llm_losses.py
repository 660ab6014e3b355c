"""Tests for the skew KL kinds and potstill.losses.llm: chunked, fused and sparse divergences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randn as _randn
from conftest import random_mask as _random_mask

from potstill.losses.divergences import SKEW_DIVERGENCES, divergence
from potstill.losses.llm import TopK, chunked_divergence, fused_linear_divergence, sparse_divergence

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
    want, want_grad = _value_and_grad(lambda s: divergence(s, teacher, kind, **opts), student)
    got, got_grad = _value_and_grad(
        lambda s: chunked_divergence(s, teacher, kind, chunk_size=chunk_size, **opts), student
    )
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad, want_grad, atol=tol, rtol=tol)


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
