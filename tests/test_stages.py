"""Multi-stage distillation pieces (potstill.stages): geometric assistant plans for layer counts
and built-in architectures, the ensemble teacher, and a chain where each student teaches the
next (born-again when the architecture repeats)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp

import potstill
from potstill.evaluate import accuracy
from potstill.models import ArchSpec, build_model
from potstill.stages import Ensemble, distill_chain, geometric_steps, plan_arch, plan_layers


def test_geometric_steps_are_equal_ratios():
    steps = geometric_steps(1000, 10, 2)
    assert steps == pytest.approx([1000 * 0.01 ** (1 / 3), 1000 * 0.01 ** (2 / 3)])
    ratios = [1000 / steps[0], steps[0] / steps[1], steps[1] / 10]
    assert ratios == pytest.approx([ratios[0]] * 3)
    with pytest.raises(ValueError, match="large > small"):
        geometric_steps(5, 10, 1)


def test_plan_layers():
    assert plan_layers(30, 8) == [15]  # √(30·8) = 15.5
    assert plan_layers(30, 8, 2) == [19, 12]
    assert plan_layers(4, 2) == [3]
    assert plan_layers(12, 6, 0) == []
    for t, s, n in [(30, 8, 3), (12, 3, 5), (40, 2, 6), (10, 8, 1)]:
        plan = plan_layers(t, s, n)
        assert len(plan) == n and all(t > a > s for a in plan)
        assert all(a > b for a, b in zip(plan, plan[1:], strict=False))  # distinct, decreasing
    with pytest.raises(ValueError, match="no room for 2 assistants"):
        plan_layers(10, 8, 2)


def test_plan_arch_for_mlps_and_cnns():
    big = ArchSpec(hidden=[1200, 1200], input_shape=[1, 8, 8])
    tiny = ArchSpec(hidden=[32], input_shape=[1, 8, 8])
    (mid,) = plan_arch(big, tiny)
    assert mid.hidden == [round((1200 * 32) ** 0.5)] * round(2**0.5)  # [196]
    assert mid.input_shape == big.input_shape and mid.kind == "mlp"
    two = plan_arch(big, tiny, 2)
    assert two[0].hidden[0] > two[1].hidden[0] > 32
    cnn_big = ArchSpec(kind="cnn", channels=[32, 64], hidden=[128], input_shape=[1, 8, 8])
    cnn_tiny = ArchSpec(kind="cnn", channels=[4, 8], hidden=[16], input_shape=[1, 8, 8])
    (c,) = plan_arch(cnn_big, cnn_tiny)
    assert c.channels == [round((32 * 64 * 4 * 8) ** 0.25)] * 2 and c.hidden == [
        round((128 * 16) ** 0.5)
    ]
    build_model(c)  # a buildable model
    with pytest.raises(ValueError, match="one kind"):
        plan_arch(big, cnn_tiny)


def test_ensemble_is_the_mean_of_its_members():
    members = [make_mlp([8], seed=s) for s in range(3)]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = sum(m(x) for m in members) / 3
        torch.testing.assert_close(Ensemble(members)(x), want)
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])


def test_chain_each_student_teaches_the_next(digits, teacher_model):
    seen = []

    def one(teacher, student, stage):
        seen.append((stage, teacher))
        return potstill.distill(teacher, student, digits.train, epochs=8, batch_size=64,
                                lr=1e-2, seed=stage, progress=False).student  # fmt: skip

    students = [make_mlp([32], seed=1), make_mlp([32], seed=2)]  # born-again: same architecture
    before = [s.state_dict()["1.weight"].clone() for s in students]
    trained = distill_chain(teacher_model, students, one)
    assert [s for s, _ in seen] == [0, 1]
    assert seen[0][1] is teacher_model and seen[1][1] is trained[0]
    assert all(
        torch.equal(s.state_dict()["1.weight"], b) for s, b in zip(students, before, strict=True)
    )
    x, y = digits.test.tensors
    for model in trained:
        assert accuracy(model.eval()(x), y) > 0.85
