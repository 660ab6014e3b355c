"""On a real GPU (skipped without one; ``benchmarks/gpu_check.py`` runs them where there is one):
``auto`` takes the GPU and ``LOCAL_RANK`` picks it under torchrun; the loop trains there with
the CPU's figures to rounding; bf16 and fp16 train; a run reports the GPU's name and each part's
peak memory; a teacher on a second GPU teaches a student on the first; a Hugging Face teacher
sharded by ``device_map`` teaches through accelerate's hooks."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_mlp, quiet_config

from potstill.config import OptimizerConfig
from potstill.placement import resolve_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


def _fit(digits, device, teacher_device=None, **train):
    from potstill.distiller import Distiller
    from potstill.evaluate import classification_eval
    from potstill.losses.terms import hinton_objective
    from potstill.teachers import LiveTeacher

    teacher = make_mlp([64], seed=1).to(teacher_device or device)
    train.setdefault("optimizer", OptimizerConfig(fused=False))
    cfg = quiet_config(max_steps=6, batch_size=64, eval_every=3, tf32=False, **train)
    return Distiller(make_mlp([32], seed=2), hinton_objective(4.0, 0.5), digits.train,
                     teacher=LiveTeacher(teacher), config=cfg, device=device,
                     evaluate=classification_eval(digits.val)).fit()  # fmt: skip


def test_auto_takes_the_gpu_and_local_rank_picks_it(monkeypatch):
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1 % torch.cuda.device_count())


def test_the_loop_on_the_gpu_gives_the_cpu_figures_to_rounding(digits):
    cpu, gpu = _fit(digits, "cpu"), _fit(digits, "cuda")
    assert gpu.device.startswith("cuda") and gpu.peak_memory_gb and gpu.peak_memory_gb > 0
    for a, b in zip(cpu.history, gpu.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert gpu.evals[-1]["accuracy"] == pytest.approx(cpu.evals[-1]["accuracy"], abs=0.01)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_gpu(digits, precision):
    fp32, low = _fit(digits, "cuda"), _fit(digits, "cuda", precision=precision)
    assert low.history[-1]["loss"] == pytest.approx(fp32.history[-1]["loss"], rel=5e-2)


def test_a_run_reports_the_gpu_and_its_peak_memory(tmp_path):
    from test_gpu_road import DIGITS

    from potstill.recipe import validate_recipe
    from potstill.runs import run

    results = run(validate_recipe({**DIGITS, "device": "cuda"}), tmp_path / "run")
    assert results["device_name"] == torch.cuda.get_device_name()
    row = results["settings"][0]["runs"]["distilled"]
    assert row["device"].startswith("cuda") and row["peak_memory_gb"] > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert torch.cuda.get_device_name() in report and "peak GPU memory" in report


@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
def test_a_teacher_on_a_second_gpu_teaches_a_student_on_the_first(digits):
    apart, together = _fit(digits, "cuda:0", "cuda:1"), _fit(digits, "cuda:0")
    assert apart.history[-1]["loss"] == pytest.approx(together.history[-1]["loss"], rel=1e-4)


def test_a_sharded_teacher_teaches_through_accelerate(tok, tmp_path):
    """``teacher.device_map: auto`` (on however many GPUs there are) with another student
    model: the run trains, and the teacher is the sharded one."""
    from test_llm_pipeline import FORTUNES, recipe_dict, save_llama

    from potstill.recipe.causal_lm import LMRecipe
    from potstill.runs import run

    if not FORTUNES.exists():
        pytest.skip("no fortune files (Debian's fortunes)")
    teacher = save_llama(tmp_path / "teacher", tok, len(tok), seed=0)
    student = save_llama(tmp_path / "student", tok, len(tok), seed=1)
    recipe = recipe_dict(teacher, variants={"fkl": [{"kind": "fkl"}]},
                         train={"max_steps": 2, "batch_size": 4, "progress": False})  # fmt: skip
    recipe["teacher"]["device_map"] = "auto"
    recipe["student"] = {"model": str(student)}
    results = run(LMRecipe.model_validate(recipe), tmp_path / "run")
    assert results["rows"]["fkl"]["steps"] == 2 and results["rows"]["fkl"]["device"] == "cuda:0"
    assert os.path.exists(tmp_path / "run" / "fkl" / "export" / "model.safetensors")


@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
def test_a_recipe_on_two_gpus_under_torchrun_equals_one_gpu(tmp_path):
    """The gloo equivalence test of tests/test_distributed.py on NCCL: each process takes
    ``cuda:LOCAL_RANK``; two of them with half the batch each end where one GPU does."""
    import json

    import yaml
    from test_distributed import DIGITS, max_difference, torchrun

    from potstill.recipe.classic import ClassicRecipe
    from potstill.runs import run

    on_gpu = {**DIGITS, "device": "cuda", "train": {**DIGITS["train"], "tf32": False}}
    run(ClassicRecipe.model_validate(on_gpu), tmp_path / "one")
    recipe = tmp_path / "two.yaml"
    two_train = {**on_gpu["train"], "batch_size": 32, "grad_accum": 2}
    recipe.write_text(yaml.safe_dump({**on_gpu, "device": "auto", "train": two_train}))
    torchrun("-m", "potstill.cli", "distill", str(recipe), "--out", str(tmp_path / "two"))
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2 and two["device"] == "cuda:0"
    for f in sorted((tmp_path / "one").rglob("final/*.safetensors")):
        assert max_difference(f, tmp_path / "two" / f.relative_to(tmp_path / "one")) < 1e-4, f
