"""Tests for potstill.losses: divergences and Hinton's KD loss against naive references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randn as _randn
from conftest import random_mask as _random_mask

from potstill.losses import DIVERGENCES, divergence, kd_loss, soft_target_loss

KINDS = ["fkl", "rkl", "jsd", "tvd", "mse"]
DISTRIBUTION_KINDS = ["fkl", "rkl", "jsd", "tvd"]
SHAPES = [(5, 7), (3, 4, 6)]


# --- naive references, one position at a time, straight from the formulas ---


def _probs(logits: list[float], temperature: float) -> list[float]:
    exps = [math.exp(x / temperature) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def _ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _ref_position(s: list[float], t: list[float], kind: str, temperature: float, beta: float):
    if kind == "mse":
        return sum((si / temperature - ti / temperature) ** 2 for si, ti in zip(s, t, strict=True))
    ps, pt = _probs(s, temperature), _probs(t, temperature)
    if kind == "fkl":
        return _ref_kl(pt, ps)
    if kind == "rkl":
        return _ref_kl(ps, pt)
    if kind == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps, strict=True))
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps, strict=True)]
    return beta * _ref_kl(pt, m) + (1 - beta) * _ref_kl(ps, m)


def _ref_divergence(student, teacher, kind, temperature=1.0, beta=0.5, mask=None) -> float:
    vocab = student.shape[-1]
    rows_s = student.reshape(-1, vocab).tolist()
    rows_t = teacher.reshape(-1, vocab).tolist()
    keep = [True] * len(rows_s) if mask is None else mask.reshape(-1).tolist()
    values = [
        _ref_position(s, t, kind, temperature, beta)
        for s, t, k in zip(rows_s, rows_t, keep, strict=True)
        if k
    ]
    return sum(values) / len(values) if values else 0.0


def _ref_kd(student, teacher, labels, temperature, alpha, ignore_index=-100) -> float:
    soft = temperature**2 * _ref_divergence(student, teacher, "fkl", temperature)
    if labels is None:
        return soft
    vocab = student.shape[-1]
    ce_terms = [
        -math.log(_probs(row, 1.0)[label])
        for row, label in zip(
            student.reshape(-1, vocab).tolist(), labels.reshape(-1).tolist(), strict=True
        )
        if label != ignore_index
    ]
    ce = sum(ce_terms) / len(ce_terms) if ce_terms else 0.0
    return alpha * soft + (1 - alpha) * ce


# --- divergence values ---


def test_divergences_table_lists_every_kind():
    # the skew kinds (skl, srkl) are checked against their own references in test_llm_losses.py
    assert set(DIVERGENCES) == set(KINDS) | {"skl", "srkl"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("use_mask", [False, True])
def test_divergence_matches_naive_reference(kind, shape, temperature, use_mask):
    student = _randn(*shape, seed=1)
    teacher = _randn(*shape, seed=2)
    mask = _random_mask(shape[:-1], seed=3) if use_mask else None
    got = divergence(student, teacher, kind, temperature=temperature, mask=mask)
    want = _ref_divergence(student, teacher, kind, temperature, mask=mask)
    assert got.dtype == torch.float64
    assert got.shape == ()
    assert got.item() == pytest.approx(want, abs=1e-10, rel=0)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_reference_for_several_betas(beta):
    student, teacher = _randn(4, 6, seed=4), _randn(4, 6, seed=5)
    got = divergence(student, teacher, "jsd", beta=beta, temperature=1.5)
    want = _ref_divergence(student, teacher, "jsd", 1.5, beta=beta)
    assert got.item() == pytest.approx(want, abs=1e-10, rel=0)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_at_beta_endpoints_is_zero_with_finite_gradient(beta):
    student = _randn(3, 5, seed=6).requires_grad_()
    value = divergence(student, _randn(3, 5, seed=7), "jsd", beta=beta)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(student.grad).all()


def test_jsd_rejects_beta_outside_unit_interval():
    with pytest.raises(ValueError, match="beta"):
        divergence(torch.zeros(2, 3), torch.zeros(2, 3), "jsd", beta=1.5)


def test_known_values():
    logits = _randn(4, 8, seed=8)
    assert divergence(logits, logits.clone(), "fkl").item() == 0.0

    disjoint_teacher = 50.0 * F.one_hot(torch.tensor([0, 1, 2]), 5).double()
    disjoint_student = 50.0 * F.one_hot(torch.tensor([3, 4, 0]), 5).double()
    tvd = divergence(disjoint_student, disjoint_teacher, "tvd")
    assert tvd.item() == pytest.approx(1.0, abs=1e-12)

    student, teacher = _randn(3, 4, 9, seed=9), _randn(3, 4, 9, seed=10)
    forward = divergence(student, teacher, "jsd", beta=0.5)
    swapped = divergence(teacher, student, "jsd", beta=0.5)
    assert forward.item() == pytest.approx(swapped.item(), abs=1e-12)
    # Jensen-Shannon with equal weights is bounded by log 2.
    assert 0.0 < forward.item() < math.log(2)


def test_fkl_and_rkl_are_the_two_kl_directions():
    student, teacher = _randn(6, 5, seed=11), _randn(6, 5, seed=12)
    assert divergence(student, teacher, "rkl").item() == pytest.approx(
        divergence(teacher, student, "fkl").item(), abs=1e-12
    )


# --- kd_loss ---


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kd_loss_matches_reference_with_partly_ignored_labels(shape, temperature, alpha):
    student, teacher = _randn(*shape, seed=13), _randn(*shape, seed=14)
    generator = torch.Generator().manual_seed(15)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    labels.view(-1)[::3] = -100
    got = kd_loss(student, teacher, labels, temperature=temperature, alpha=alpha)
    want = _ref_kd(student, teacher, labels, temperature, alpha)
    assert got.item() == pytest.approx(want, abs=1e-10, rel=0)


def test_kd_loss_custom_ignore_index():
    student, teacher = _randn(5, 4, seed=16), _randn(5, 4, seed=17)
    labels = torch.tensor([0, 7, 2, 7, 3])
    got = kd_loss(student, teacher, labels, alpha=0.4, ignore_index=7)
    want = _ref_kd(student, teacher, labels, 2.0, 0.4, ignore_index=7)
    assert got.item() == pytest.approx(want, abs=1e-10, rel=0)


def test_kd_loss_all_labels_ignored_gives_soft_term_only():
    student = _randn(4, 6, seed=18).requires_grad_()
    teacher = _randn(4, 6, seed=19)
    labels = torch.full((4,), -100)
    got = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.25)
    soft = 4.0 * _ref_divergence(student.detach(), teacher, "fkl", 2.0)
    assert got.item() == pytest.approx(0.25 * soft, abs=1e-10, rel=0)
    got.backward()
    assert torch.isfinite(student.grad).all()


def test_kd_loss_all_ignored_with_pure_ce_is_zero_and_connected():
    student = _randn(3, 5, seed=20).requires_grad_()
    got = kd_loss(student, _randn(3, 5, seed=21), torch.full((3,), -100), alpha=0.0)
    assert got.item() == 0.0
    got.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_kd_loss_without_labels_is_t_squared_kl_and_ignores_alpha(alpha):
    student, teacher = _randn(2, 3, 7, seed=22), _randn(2, 3, 7, seed=23)
    got = kd_loss(student, teacher, temperature=3.0, alpha=alpha)
    want = _ref_kd(student, teacher, None, 3.0, alpha)
    assert got.item() == pytest.approx(want, abs=1e-10, rel=0)
    assert got.item() == pytest.approx(
        soft_target_loss(student, teacher, temperature=3.0).item(), abs=1e-12
    )


def test_kd_loss_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels shape"):
        kd_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_one_hot_teacher_soft_term_gradient_equals_cross_entropy_gradient():
    labels = torch.tensor([2, 0, 4, 1, 3, 2])
    # 1e3 * one-hot puts exp(-1000) ≈ 0 (underflow) on the other classes: exactly one-hot.
    teacher = 1e3 * F.one_hot(labels, 5).double()
    assert torch.equal(teacher.softmax(-1), F.one_hot(labels, 5).double())

    student = _randn(6, 5, seed=24).requires_grad_()
    soft = kd_loss(student, teacher, labels, temperature=1.0, alpha=1.0)
    (soft_grad,) = torch.autograd.grad(soft, student)

    student_ce = student.detach().clone().requires_grad_()
    ce = F.cross_entropy(student_ce, labels)
    (ce_grad,) = torch.autograd.grad(ce, student_ce)

    assert soft.item() == pytest.approx(ce.item(), abs=1e-12)
    torch.testing.assert_close(soft_grad, ce_grad, atol=1e-12, rtol=0)
    expected = (student.detach().softmax(-1) - F.one_hot(labels, 5)) / 6
    torch.testing.assert_close(soft_grad, expected, atol=1e-12, rtol=0)


def test_t_squared_keeps_gradient_scale_roughly_constant():
    student0, teacher = _randn(32, 10, seed=25), _randn(32, 10, seed=26)
    temperatures = [1.0, 2.0, 4.0, 8.0]
    with_factor, without_factor = [], []
    for temperature in temperatures:
        student = student0.clone().requires_grad_()
        soft_target_loss(student, teacher, temperature=temperature).backward()
        with_factor.append(student.grad.norm().item())
        without_factor.append(with_factor[-1] / temperature**2)
    # Without T², grad ≈ (s − t) / (N·T²) for large T; measured spans: ~1.2× vs ~16×.
    assert max(with_factor) / min(with_factor) < 2.0
    assert max(without_factor[1:]) / min(without_factor[1:]) > 10.0


# --- gradients ---


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_gradcheck(kind):
    student = _randn(2, 3, 4, seed=27).requires_grad_()
    teacher = _randn(2, 3, 4, seed=28).requires_grad_()
    mask = _random_mask((2, 3), seed=29)

    def fn(s, t):
        return divergence(s, t, kind, temperature=1.7, beta=0.3, mask=mask)

    assert torch.autograd.gradcheck(fn, (student, teacher))


def test_kd_loss_gradcheck():
    student = _randn(2, 3, 5, seed=30).requires_grad_()
    teacher = _randn(2, 3, 5, seed=31).requires_grad_()
    labels = torch.tensor([[1, -100, 4], [0, 2, -100]])

    def fn(s, t):
        return kd_loss(s, t, labels, temperature=2.5, alpha=0.7)

    assert torch.autograd.gradcheck(fn, (student, teacher))


# --- invariances ---


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
@pytest.mark.parametrize(
    "shift_student, shift_teacher", [(True, False), (False, True), (True, True)]
)
def test_per_row_shift_changes_no_divergence(kind, shift_student, shift_teacher):
    student, teacher = _randn(3, 4, 6, seed=32), _randn(3, 4, 6, seed=33)
    shift = _randn(3, 4, 1, seed=34, scale=50.0)
    base = divergence(student, teacher, kind, temperature=2.0)
    shifted = divergence(
        student + shift if shift_student else student,
        teacher - shift if shift_teacher else teacher,
        kind,
        temperature=2.0,
    )
    assert shifted.item() == pytest.approx(base.item(), abs=1e-10)


def test_per_row_shift_changes_mse_because_it_compares_logits():
    student, teacher = _randn(3, 6, seed=35), _randn(3, 6, seed=36)
    base = divergence(student, teacher, "mse")
    assert divergence(student + 1.0, teacher, "mse").item() != pytest.approx(base.item())


def test_per_row_shift_changes_no_kd_loss():
    student, teacher = _randn(4, 5, 6, seed=37), _randn(4, 5, 6, seed=38)
    labels = torch.randint(0, 6, (4, 5), generator=torch.Generator().manual_seed(39))
    labels[0, 0] = -100
    base = kd_loss(student, teacher, labels, temperature=3.0, alpha=0.6)
    for ds, dt in itertools.product([0.0, 1.0], repeat=2):
        shift_s = ds * _randn(4, 5, 1, seed=40, scale=30.0)
        shift_t = dt * _randn(4, 5, 1, seed=41, scale=30.0)
        shifted = kd_loss(student + shift_s, teacher + shift_t, labels, temperature=3.0, alpha=0.6)
        assert shifted.item() == pytest.approx(base.item(), abs=1e-10)


# --- edge cases ---


@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask_gives_exact_zero_and_zero_gradients(kind):
    student = _randn(2, 3, 5, seed=42, dtype=torch.float32).requires_grad_()
    teacher = _randn(2, 3, 5, seed=43, dtype=torch.float32).requires_grad_()
    value = divergence(student, teacher, kind, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert value.item() == 0.0
    assert value.requires_grad
    value.backward()
    for grad in (student.grad, teacher.grad):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_magnitude_logits_stay_finite(kind, dtype):
    generator = torch.Generator().manual_seed(44)
    student = ((torch.rand(4, 3, 16, generator=generator) * 2 - 1) * 1e4).to(dtype)
    teacher = ((torch.rand(4, 3, 16, generator=generator) * 2 - 1) * 1e4).to(dtype)
    student.requires_grad_()
    value = divergence(student, teacher, kind, temperature=0.5)
    value.backward()
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(kind, dtype):
    student, teacher = _randn(4, 9, seed=45, dtype=dtype), _randn(4, 9, seed=46, dtype=dtype)
    got = divergence(student, teacher, kind, temperature=2.0)
    want = divergence(student.float(), teacher.float(), kind, temperature=2.0)
    assert got.dtype == torch.float32
    assert got.item() == want.item()


def test_kd_loss_large_logits_finite():
    generator = torch.Generator().manual_seed(47)
    student = ((torch.rand(8, 10, generator=generator) * 2 - 1) * 1e4).requires_grad_()
    teacher = (torch.rand(8, 10, generator=generator) * 2 - 1) * 1e4
    labels = torch.randint(0, 10, (8,), generator=generator)
    value = kd_loss(student, teacher, labels, temperature=4.0)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(student.grad).all()


# --- errors ---


def test_unknown_kind_names_it_and_lists_accepted():
    with pytest.raises(ValueError, match="'kld'") as info:
        divergence(torch.zeros(2, 3), torch.zeros(2, 3), "kld")
    for kind in KINDS:
        assert kind in str(info.value)


def test_shape_mismatch_reports_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        divergence(torch.zeros(2, 3), torch.zeros(2, 4), "fkl")
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_mask_shape_mismatch():
    with pytest.raises(ValueError, match="mask shape"):
        divergence(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), "fkl", mask=torch.ones(2, 4).bool())


def test_non_bool_mask_rejected():
    with pytest.raises(ValueError, match="bool"):
        divergence(torch.zeros(2, 4), torch.zeros(2, 4), "fkl", mask=torch.ones(2))


def test_non_positive_temperature_rejected():
    with pytest.raises(ValueError, match="temperature"):
        divergence(torch.zeros(2, 4), torch.zeros(2, 4), "fkl", temperature=0.0)
