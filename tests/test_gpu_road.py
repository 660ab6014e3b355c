"""Every recipe kind runs on a GPU, checked on this CPU-only machine with the fake GPU of
:mod:`fakegpu`: a few steps of each kind with ``device: fakegpu`` (student, teacher, batches,
teacher cache reads, evaluation, generation, on-policy sampling and exports all placed there;
any CPU tensor meeting a GPU one raises) give the same figures as the same recipe with
``device: cpu``, and a teacher can be put on the CPU apart from a GPU student. Unknown
devices, and devices this machine lacks, are refused before anything loads, naming the field.

On a machine with a GPU, ``POTSTILL_ROAD_DEVICE=cuda`` runs the same tests on it
(``benchmarks/gpu_check.py`` does): the figures then agree with the CPU's only to rounding
(other kernels), so they are compared loosely and generations are not compared."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import needs_fashion_mnist, needs_minilm
from fakegpu import NAME as FAKE

from potstill.recipe import RecipeError, validate_recipe
from potstill.runs import run

NAME = os.environ.get("POTSTILL_ROAD_DEVICE") or FAKE
EXACT = NAME == FAKE  # the fake GPU computes with the CPU's kernels: the very same figures
TOLERANCE = {"rel": 1e-5, "abs": 1e-6} if EXACT else {"rel": 5e-2, "abs": 5e-2}

# one optimizer implementation on both devices (the CPU's default is the fused AdamW kernel,
# another device's the multi-tensor one), so the figures agree bit for bit
QUIET = {"progress": False, "tensorboard": False, "optimizer": {"fused": False}}
# figures that measure the machine, not the model: they differ between any two runs
MACHINE_WORDS = ("_s", "per_s", "latency", "throughput", "speedup", "device", "path", "ms",
                 "wall", "time", "ready", "export", "metrics", "precision")  # fmt: skip


def _quality(results: Any, key: str = "") -> Any:
    """The results with every figure of the machine (times, speeds, devices, paths) left out."""
    if isinstance(results, dict):
        return {
            k: _quality(v, k) for k, v in results.items() if not any(w in k for w in MACHINE_WORDS)
        }
    if isinstance(results, list):
        return [_quality(v, key) for v in results]
    return results


def _close(a: Any, b: Any, where: str = "results") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not math.isnan(a):
        assert a == pytest.approx(b, **TOLERANCE), where
    else:
        assert a == b or (a != a and b != b), where


def _both(recipe: dict[str, Any], tmp_path: Path, **gpu: Any) -> tuple[dict, dict, Path]:
    """The recipe run on the CPU and on the fake GPU (``gpu``: more fields for that run)."""
    out = []
    for device in ("cpu", NAME):
        data = {**copy.deepcopy(recipe), "device": device}
        if device == NAME:
            data.update(gpu)
        out.append(run(validate_recipe(data), tmp_path / device))
    return out[0], out[1], tmp_path / NAME


def _trained_on(results: Any) -> list[str]:
    """The device of every part the run trained (each records where it ran)."""
    if isinstance(results, list):
        return [d for v in results for d in _trained_on(v)]
    if not isinstance(results, dict):
        return []
    here = [results["device"]] if "steps" in results and "device" in results else []
    return here + [d for k, v in results.items() if k != "device" for d in _trained_on(v)]


def _same(cpu: dict, gpu: dict) -> None:
    assert gpu["device"] == f"{NAME}:0" and cpu["device"] == "cpu"
    parts = _trained_on(gpu)
    assert parts and set(parts) == {f"{NAME}:0"}, parts  # every student trained on the GPU
    assert set(_trained_on(cpu)) == {"cpu"}
    compared = _quality(gpu)
    assert len(json.dumps(compared)) > 200  # the figures of the models are there to compare
    _close(_quality(cpu), compared)


DIGITS = {
    "name": "gpu-digits",
    "data": {"name": "digits"},
    "teacher": {"arch": {"kind": "mlp", "hidden": [32]},
                "train": {"max_steps": 6, "batch_size": 64, **QUIET}},
    "student": {"arch": {"kind": "mlp", "hidden": [8]}},
    "train": {"max_steps": 4, "batch_size": 64, **QUIET},
    "settings": [{"name": "few", "labelled_fraction": 0.5}],
    "evaluation": {"throughput_batch": 32, "measure_cache_speedup": False},
}  # fmt: skip


def test_a_classic_run_on_the_gpu_gives_the_cpu_figures(tmp_path):
    cpu, gpu, folder = _both(DIGITS, tmp_path)
    _same(cpu, gpu)
    assert gpu["teacher_device"] == f"{NAME}:0"
    assert (folder / "teacher" / "cache-train").exists()  # the cached teacher was read there
    # the exported students load on the CPU (safetensors written from the GPU)
    from potstill.vision import load_classifier

    student = load_classifier(folder / "few" / "distilled" / "final")
    assert next(student.parameters()).device.type == "cpu"


def test_a_teacher_on_the_cpu_teaches_a_student_on_the_gpu(tmp_path):
    """``teacher.device: cpu``: its signals (live, for a feature term) come to the student."""
    recipe = {
        **DIGITS,
        "teacher": {**DIGITS["teacher"], "cache": False},
        "taps": {"student": {"h": "1"}, "teacher": {"h": "1"}},
        "objective": [{"kind": "kd", "temperature": 4.0}, {"kind": "feature", "student": "h",
                                                          "teacher": "h"}],
    }  # fmt: skip
    cpu, gpu, _ = _both(recipe, tmp_path, teacher={**recipe["teacher"], "device": "cpu"})
    assert gpu["teacher_device"] == "cpu"
    _same(cpu, gpu)


def test_a_chain_runs_on_the_gpu(tmp_path):
    chain = {"kind": "chain", "name": "gpu-chain", "generations": 2, "base": DIGITS}
    out = []
    for device in ("cpu", NAME):
        data = copy.deepcopy(chain)
        data["base"]["device"] = device
        out.append(run(validate_recipe(data), tmp_path / device))
    _close(_quality(out[0]), _quality(out[1]))


@needs_fashion_mnist
def test_hugging_face_image_classifiers_train_on_the_gpu(tmp_path):
    from test_image_classifiers import RESNET, VIT
    from test_image_tables import write_image_folder

    root = tmp_path / "images"
    write_image_folder(root)
    recipe = {
        "kind": "image-classification", "name": "gpu-images",
        "data": {"source": {"path": str(root)}, "val_size": 20},
        "teacher": {"config": RESNET, "train": {"max_steps": 3, "batch_size": 20, **QUIET}},
        "student": {"config": VIT},
        "train": {"max_steps": 3, "batch_size": 20, **QUIET},
        "evaluation": {"throughput_batch": 8, "measure_cache_speedup": False},
    }  # fmt: skip
    cpu, gpu, folder = _both(recipe, tmp_path)
    _same(cpu, gpu)
    assert (folder / "main" / "distilled" / "final" / "config.json").exists()


@needs_minilm
def test_a_text_classifier_distils_on_the_gpu(tmp_path):
    from test_text_classification import recipe_data, write_csv

    write_csv(tmp_path / "topics.csv")
    recipe = recipe_data(tmp_path / "topics.csv")
    recipe["teacher"]["finetune"] = {"max_steps": 2, "batch_size": 8, **QUIET}
    recipe["train"] = {"max_steps": 2, "batch_size": 8, **QUIET}
    cpu, gpu, folder = _both(recipe, tmp_path / "runs")
    _same(cpu, gpu)
    assert (folder / "distilled" / "final" / "model.safetensors").exists()


@needs_minilm
def test_a_sentence_encoder_distils_on_the_gpu(tmp_path):
    from test_embed import MINILM_NAME as MINILM

    recipe = {
        "kind": "embed", "name": "gpu-embed",
        "teacher": {"model": MINILM}, "student": {"model": MINILM, "keep": 1},
        "data": {"train": 16, "val": 12, "max_length": 16},
        "variants": {"cosine": [{"kind": "feature", "student": "logits", "teacher": "logits",
                                 "loss": "cosine"}]},
        "train": {"max_steps": 2, "batch_size": 8, **QUIET},
        "latency_batch": 1, "throughput_batch": 4,
    }  # fmt: skip
    cpu, gpu, _ = _both(recipe, tmp_path)
    _same(cpu, gpu)


@pytest.fixture(scope="module")
def tiny_lm(tok, tmp_path_factory):
    from test_llm_pipeline import save_llama

    return save_llama(tmp_path_factory.mktemp("tiny-llama"), tok, len(tok), seed=0)


@pytest.mark.parametrize("teacher", ["live", "cached"])
def test_a_causal_lm_distils_on_the_gpu(tiny_lm, tmp_path, teacher):
    """Live (with on-policy sampling and generation) and from a teacher cache."""
    from test_llm_pipeline import FORTUNES, recipe_dict

    if not FORTUNES.exists():
        pytest.skip("no fortune files (Debian's fortunes)")
    variants: dict[str, Any] = {"fkl": [{"kind": "fkl"}]}
    if teacher == "live":
        variants["gkd"] = {"terms": [{"kind": "jsd"}], "on_policy": 0.5,
                           "sampling": {"max_new_tokens": 4}}  # fmt: skip
    recipe = recipe_dict(
        tiny_lm, variants=variants, train={"max_steps": 2, "batch_size": 4, **QUIET},
        data={"train": 8, "val": 4, "max_length": 32},
        generate={"prompts": ["A fortune about love."], "max_new_tokens": 3},
    )  # fmt: skip
    recipe["teacher"]["cache"] = teacher == "cached"
    cpu, gpu, folder = _both(recipe, tmp_path)
    _same(cpu, gpu)
    if EXACT:
        assert gpu["generations"] == cpu["generations"]  # generated where the models are
    assert json.loads((folder / "fkl" / "done.json").read_text())["steps"] == 2


def test_devices_are_refused_before_anything_loads(tmp_path):
    with pytest.raises(RecipeError, match="device: Value error, unknown device 'gpu'"):
        validate_recipe({**DIGITS, "device": "gpu"})
    with pytest.raises(RecipeError, match="teacher.device: .*unknown device 'cuda:x'"):
        validate_recipe({**DIGITS, "teacher": {**DIGITS["teacher"], "device": "cuda:x"}})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device: cuda was asked for but CUDA is not"):
            run(validate_recipe({**DIGITS, "device": "cuda"}), tmp_path / "a")
        with pytest.raises(ValueError, match="^teacher.device: cuda:1 was asked for"):
            run(validate_recipe({**DIGITS, "teacher": {**DIGITS["teacher"], "device": "cuda:1"}}),
                tmp_path / "b")  # fmt: skip
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_command_line_places_the_run(tmp_path):
    """``--device`` and ``--teacher-device`` set the recipe's fields (a chain's base too); a
    run resumes on another device (``device`` is not part of the resume check)."""
    import yaml
    from typer.testing import CliRunner

    from potstill.cli import app

    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(DIGITS))
    out = tmp_path / "run"
    args = ["distill", str(path), "--out", str(out)]
    done = CliRunner().invoke(app, [*args, "--device", NAME, "--teacher-device", "cpu"])
    assert done.exit_code == 0, done.output
    results = json.loads((out / "results.json").read_text())
    assert (results["device"], results["teacher_device"]) == (f"{NAME}:0", "cpu")
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["device"] == NAME and saved["teacher"]["device"] == "cpu"
    again = CliRunner().invoke(app, [*args, "--device", "cpu", "--resume"])
    assert again.exit_code == 0, again.output  # finished parts reused, on the CPU
    assert json.loads((out / "results.json").read_text())["device"] == "cpu"
    wrong = CliRunner().invoke(app, [*args, "--device", "tpu", "--overwrite"])
    assert wrong.exit_code != 0 and "device: Value error, unknown device 'tpu'" in wrong.output
    chain = tmp_path / "chain.yaml"
    chain.write_text(yaml.safe_dump({"kind": "chain", "generations": 1, "base": DIGITS}))
    done = CliRunner().invoke(app, ["distill", str(chain), "--out", str(tmp_path / "c"),
                                    "--device", NAME])  # fmt: skip
    assert done.exit_code == 0, done.output
    saved = yaml.safe_load((tmp_path / "c" / "recipe.yaml").read_text())
    assert saved["base"]["device"] == NAME
