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
from potstill.stages import distill_chain, geometric_steps, plan_arch, plan_layers
from potstill.teachers import Ensemble


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


# --- chain recipes (kind: chain) on digits ---


def _chain(**over):
    from potstill.recipe.chain import ChainRecipe

    base = {
        "data": {"name": "digits", "val_size": 200},
        "teacher": {"arch": {"hidden": [96, 96]},
                    "train": {"epochs": 4, "batch_size": 64, "progress": False}},
        "student": {"arch": {"hidden": [8]}},
        "objective": [{"kind": "kd", "weight": 0.9, "temperature": 2.0},
                      {"kind": "ce", "weight": 0.1}],
        "train": {"epochs": 3, "batch_size": 64, "progress": False},
        "settings": [{"name": "main"}],
        "evaluation": {"measure_cache_speedup": False},
    }  # fmt: skip
    return ChainRecipe.model_validate({"kind": "chain", "name": "tiny-chain", "base": base, **over})


def test_chain_recipe_plans_assistants_and_runs_each_stage(tmp_path):
    import json

    from potstill.runs import run as run_recipe

    chain = _chain(assistants=1, direct=True)
    assert [s.name for s in chain.planned()] == ["assistant-1", "student"]
    assert chain.planned()[0].set["student"]["arch"]["hidden"] == [round((96 * 8) ** 0.5)]  # [28]
    out = run_recipe(chain, tmp_path / "run")
    assert out["stages"] == ["assistant-1", "student", "direct"]
    # stage 2's teacher is stage 1's distilled student; 'direct' learns from the first teacher
    student_recipe = (tmp_path / "run" / "student" / "recipe.yaml").read_text()
    assert str(tmp_path / "run" / "assistant-1" / "main" / "distilled" / "final") in student_recipe
    direct_recipe = (tmp_path / "run" / "direct" / "recipe.yaml").read_text()
    assert str(tmp_path / "run" / "assistant-1" / "teacher" / "final") in direct_recipe
    # same teacher, same data: 'direct' reads the first stage's logit cache (linked, not redone)
    shards = sorted(
        (tmp_path / "run" / "assistant-1" / "teacher" / "cache-train").rglob("*.safetensors")
    )
    linked = sorted(
        (tmp_path / "run" / "direct" / "teacher" / "cache-train").rglob("*.safetensors")
    )
    assert shards and [p.stat().st_ino for p in linked] == [p.stat().st_ino for p in shards]
    models = [r["model"] for r in out["rows"]]
    assert models[0] == "teacher" and "assistant-1 (distilled)" in models
    assert "student (without teacher)" in models and "direct (distilled)" in models
    params = {r["model"]: r["parameters"] for r in out["rows"]}
    assert params["teacher"] > params["assistant-1 (distilled)"] > params["student (distilled)"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "change from its teacher" in md and "| direct (distilled) |" in md
    assert json.loads((tmp_path / "run" / "results.json").read_text())["setting"] == "main"
    # a resumed chain retrains nothing: every trained model file stays as it was
    trained = sorted((tmp_path / "run").glob("**/final/*.safetensors"))
    assert len(trained) == 7  # the teacher, and per stage the distilled student and its baseline
    stamps = {p: p.stat().st_mtime_ns for p in trained}
    again = run_recipe(chain, tmp_path / "run", resume=True)
    assert {p: p.stat().st_mtime_ns for p in trained} == stamps
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in out["rows"]]
    with pytest.raises(ValueError, match="already holds a run"):
        run_recipe(chain, tmp_path / "run")
    from conftest import assert_report_rebuilds, assert_results_header

    assert_results_header(out, "chain")
    assert out["seed"] == chain.base.get("seed", 0)
    assert_report_rebuilds(tmp_path / "run")


def test_born_again_chain_with_the_ensemble_of_generations(tmp_path):
    import yaml

    from potstill.runs import run as run_recipe

    out = run_recipe(_chain(generations=2, ensemble=True), tmp_path / "run")
    assert out["stages"] == ["generation-1", "generation-2", "ensemble"]
    teacher = yaml.safe_load((tmp_path / "run" / "ensemble" / "recipe.yaml").read_text())["teacher"]
    assert teacher["path"] == [
        str(tmp_path / "run" / f"generation-{i}" / "main" / "distilled" / "final") for i in (1, 2)
    ]
    rows = {r["model"]: r for r in out["rows"]}
    assert (
        rows["ensemble (distilled)"]["parameters"] == rows["generation-1 (distilled)"]["parameters"]
    )
    results = yaml.safe_load((tmp_path / "run" / "ensemble" / "results.json").read_text())
    assert results["teacher"]["source"].startswith("ensemble of ")
    # the ensemble teacher is twice a generation's size: both members run on each batch
    assert results["teacher"]["parameters"] == 2 * rows["generation-1 (distilled)"]["parameters"]


def test_chain_recipe_generations_and_errors():
    chain = _chain(generations=2)
    assert [s.name for s in chain.planned()] == ["generation-1", "generation-2"]
    with pytest.raises(ValueError, match="exactly one of stages, assistants or generations"):
        _chain(generations=2, assistants=1)
    with pytest.raises(ValueError, match="from_setting"):
        _chain(generations=2, from_setting="nope")
    with pytest.raises(ValueError, match="unique"):
        _chain(stages=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="give generations"):
        _chain(assistants=1, ensemble=True)
    with pytest.raises(ValueError, match="student.arch.hidden"):
        _chain(stages=[{"name": "a", "set": {"student": {"arch": {"hidden": "x"}}}}])
