"""End-to-end tests: a recipe run on digits (teacher, baseline and distilled students, results,
report), resuming it, the command line, and the one-call Python API."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    assert_report_rebuilds,
    assert_results_header,
    card_metric,
    make_mlp,
    needs_fashion_mnist,
    quiet_config,
    read_card,
    state_equal,
)

import potstill
from potstill.cache import CachedTeacher
from potstill.config import OptimizerConfig, ScheduleConfig
from potstill.data.rows import DataError
from potstill.data.splits import hide_labels, labelled_only, load_splits
from potstill.distiller import Distiller
from potstill.evaluate import accuracy, agreement, predict_logits
from potstill.losses.terms import hinton_objective, labels_only_objective
from potstill.models import ArchSpec, build_model, count_parameters, load_model_folder
from potstill.recipe import RecipeError, load_recipe
from potstill.recipe.classic import ClassicRecipe
from potstill.runs import run as run_recipe
from potstill.teachers import LiveTeacher

ROW_LABELS = ("teacher", "student without teacher", "student, distilled")
_SCRIPT = Path(sys.executable).parent / "potstill"
POTSTILL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "potstill.cli"]

RECIPE = {
    "name": "tiny-digits",
    "seed": 0,
    "data": {"name": "digits"},
    "teacher": {
        "arch": {"kind": "mlp", "hidden": [64]},
        "train": {
            "epochs": 3,
            "batch_size": 64,
            "optimizer": {"lr": 0.01},
            "progress": False,
            "tensorboard": False,
        },
        "cache": True,
    },
    "student": {"arch": {"kind": "mlp", "hidden": [8]}},
    "objective": [
        {"kind": "kd", "weight": 0.7, "temperature": 4.0},
        {"kind": "ce", "weight": 0.3},
    ],
    "train": {
        "epochs": 3,
        "batch_size": 64,
        "optimizer": {"lr": 0.01},
        "progress": False,
        "tensorboard": False,
    },
    "settings": [
        {"name": "few-labels", "labelled_fraction": 0.2},
        {"name": "same-data", "labelled_fraction": 1.0},
    ],
}


def _recipe_file(folder: Path, overrides: dict | None = None) -> Path:
    data = copy.deepcopy(RECIPE)
    data.update(overrides or {})
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One recipe run shared by the tests of this module: (run_dir, recipe, results)."""
    folder = tmp_path_factory.mktemp("pipeline")
    recipe = load_recipe(_recipe_file(folder))
    run_dir = folder / "run"
    results = run_recipe(recipe, run_dir)
    return run_dir, recipe, results


def _arch(hidden: list[int]) -> ArchSpec:
    return ArchSpec(kind="mlp", hidden=hidden, input_shape=[1, 8, 8], num_classes=10)


def test_results_have_teacher_baseline_and_distilled_rows(run):
    run_dir, _, results = run
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(
        json.dumps(results, default=str)
    )
    assert results["data"] == {"name": "digits", "train": 1151, "val": 287, "test": 359}
    teacher = results["teacher"]
    assert 0 < teacher["accuracy"] <= 1
    assert teacher["accuracy"] > 0.5  # 10 classes: far above chance
    assert teacher["parameters"] == count_parameters(build_model(_arch([64]))) == 4810
    assert teacher["source"] == "trained in this run"
    assert "agreement" not in teacher
    assert teacher["file_bytes"] > 4 * 4810

    student_params = count_parameters(build_model(_arch([8])))
    assert student_params == 64 * 8 + 8 + 8 * 10 + 10
    assert [s["name"] for s in results["settings"]] == ["few-labels", "same-data"]
    for s in results["settings"]:
        assert set(s["runs"]) == {"baseline", "distilled"}
        assert s["transfer_examples"] == 1151
        for kind, row in s["runs"].items():
            assert 0 < row["accuracy"] <= 1, kind
            assert 0 <= row["agreement"] <= 1, kind
            assert row["parameters"] == student_params
            assert row["latency_ms"] > 0 and row["throughput"] > 0
            assert (run_dir / row["metrics"]).exists()
        runs = s["runs"]
        # the same budget: as many optimizer steps, 3 epochs of the transfer set at batch 64
        assert runs["baseline"]["steps"] == runs["distilled"]["steps"] == 3 * 18
        assert runs["distilled"]["examples"] == 1151
        assert runs["baseline"]["examples"] == s["labelled_examples"]
    few, same = results["settings"]
    x, y = load_splits("digits").train.tensors
    expected_few = sum(max(1, round(0.2 * int(n))) for n in y.bincount())
    assert few["labelled_examples"] == expected_few
    assert same["labelled_examples"] == 1151


def test_saved_models_reproduce_the_reported_figures(run):
    run_dir, _, results = run
    splits = load_splits("digits")
    teacher, spec = load_model_folder(run_dir / "teacher" / "final")
    assert spec == _arch([64])
    t_logits, labels = predict_logits(teacher, splits.test)
    assert accuracy(t_logits, labels) == results["teacher"]["accuracy"]
    for s in results["settings"]:
        for kind, row in s["runs"].items():
            model, _ = load_model_folder(run_dir / s["name"] / kind / "final")
            logits, _ = predict_logits(model, splits.test)
            assert accuracy(logits, labels) == row["accuracy"], (s["name"], kind)
            assert agreement(logits, t_logits) == row["agreement"], (s["name"], kind)
    # the teacher cache describes the training set and this teacher
    CachedTeacher(run_dir / "teacher" / "cache-train", dataset=splits.train, teacher=teacher)


def test_baseline_and_distilled_start_from_the_same_weights(run):
    """Rebuild both students of one setting by hand from the same seed and compare."""
    run_dir, recipe, results = run
    splits = load_splits("digits")
    teacher, _ = load_model_folder(run_dir / "teacher" / "final")
    train = hide_labels(splits.train, 0.2, recipe.seed)
    torch.manual_seed(recipe.seed)
    init = build_model(_arch([8]))
    cfg = recipe.train.model_copy(update={"seed": recipe.seed})
    distilled = Distiller(
        copy.deepcopy(init),
        recipe.build_objective(),
        train,
        teacher=LiveTeacher(teacher),
        config=cfg,
    ).fit()
    baseline = Distiller(
        copy.deepcopy(init),
        labels_only_objective(),
        labelled_only(train),
        config=cfg.model_copy(update={"max_steps": distilled.steps, "epochs": None}),
    ).fit()
    for kind, model in (("distilled", distilled.student), ("baseline", baseline.student)):
        saved, _ = load_model_folder(run_dir / "few-labels" / kind / "final")
        for (name, a), (_, b) in zip(
            saved.state_dict().items(), model.state_dict().items(), strict=True
        ):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{kind} {name}")


def test_report_files(run):
    run_dir, _, results = run
    md = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    for label in ROW_LABELS:
        assert md.count(f"| {label} |") == 2  # one table per setting
        assert f"<td>{label}</td>" in page
    assert "data:image/png;base64," in page
    assert page.count("<img") == 2
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    for png in ("losses.png", "tradeoffs.png"):
        assert (run_dir / png).read_bytes().startswith(b"\x89PNG")
        assert f"]({png})" in md
    teacher_acc = f"{100 * results['teacher']['accuracy']:.2f}%"
    assert teacher_acc in md
    for s in results["settings"]:
        assert f"## Setting `{s['name']}`" in md
        for row in s["runs"].values():
            assert f"{100 * row['accuracy']:.2f}%" in md
    assert "## Teacher cache" in md


def test_rerun_without_resume_is_refused(run):
    run_dir, recipe, _ = run
    with pytest.raises(RecipeError, match="--resume"):
        run_recipe(recipe, run_dir)


def test_resume_with_another_recipe_names_the_field(run):
    run_dir, recipe, _ = run
    changed = recipe.model_copy(deep=True)
    changed.train.epochs = 4
    changed.settings[0].labelled_fraction = 0.3
    with pytest.raises(RecipeError) as info:
        run_recipe(changed, run_dir, resume=True)
    message = str(info.value)
    assert "train.epochs" in message
    assert "settings" in message
    assert "teacher" not in message.split("differ:")[1]
    saved = ClassicRecipe.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    assert saved == recipe  # the refused run did not overwrite the saved recipe


def test_overwrite_replaces_a_previous_run(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "teacher").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"name": "old"}))
    (run_dir / "teacher" / "stale.txt").write_text("from the old run")
    recipe = load_recipe("default", ["data.data_dir=" + str(tmp_path / "no-data")])
    with pytest.raises(DataError):  # fails right after preparing the folder: cheap
        run_recipe(recipe, run_dir, overwrite=True)
    assert not (run_dir / "teacher" / "stale.txt").exists()
    # recipe.yaml is written only once the data has loaded, so the failed start blocks no retry
    assert not (run_dir / "recipe.yaml").exists()
    with pytest.raises(DataError):
        run_recipe(recipe, run_dir)


def test_overwrite_does_not_delete_a_folder_that_is_not_a_run(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("not a potstill run")
    recipe = load_recipe("default", ["data.data_dir=" + str(tmp_path / "no-data")])
    with pytest.raises((RecipeError, DataError)):
        run_recipe(recipe, tmp_path, overwrite=True)
    assert precious.exists()


def test_resume_reuses_finished_sub_runs(run):
    run_dir, recipe, results = run
    done = sorted(run_dir.rglob("done.json"))
    assert len(done) == 5  # teacher + 2 settings x (baseline, distilled)
    finals = sorted(run_dir.rglob("final/model.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in done + finals}
    again = run_recipe(recipe, run_dir, resume=True)
    assert {p: p.stat().st_mtime_ns for p in done + finals} == stamps
    assert again["teacher"]["accuracy"] == results["teacher"]["accuracy"]
    for a, b in zip(again["settings"], results["settings"], strict=True):
        for kind in ("baseline", "distilled"):
            assert a["runs"][kind]["accuracy"] == b["runs"][kind]["accuracy"]
            assert a["runs"][kind]["agreement"] == b["runs"][kind]["agreement"]
            assert a["runs"][kind]["steps"] == b["runs"][kind]["steps"]


def test_resume_after_a_crash_between_training_and_done_json(run):
    """Training finished and checkpointed, but the process died before ``final/`` and
    ``done.json`` were written: resume restores the last checkpoint and trains no further."""
    run_dir, recipe, results = run
    sub = run_dir / "same-data" / "distilled"
    before, _ = load_model_folder(sub / "final")
    info = json.loads((sub / "done.json").read_text())
    (sub / "done.json").unlink()
    for p in (sub / "final").iterdir():
        p.unlink()
    (sub / "final").rmdir()
    baseline_done = (run_dir / "same-data" / "baseline" / "done.json").stat().st_mtime_ns

    again = run_recipe(recipe, run_dir, resume=True)
    after, _ = load_model_folder(sub / "final")
    assert state_equal(before, after)
    new_info = json.loads((sub / "done.json").read_text())
    for key in ("steps", "val_final", "val_best", "examples"):
        assert new_info[key] == info[key], key
    assert (run_dir / "same-data" / "baseline" / "done.json").stat().st_mtime_ns == baseline_done
    row = again["settings"][1]["runs"]["distilled"]
    assert row["accuracy"] == results["settings"][1]["runs"]["distilled"]["accuracy"]
    rows = [json.loads(x) for x in (sub / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "eval" not in r]
    assert len(steps) == len(set(steps))


def test_report_html_gives_each_setting_summary_its_own_item(run):
    run_dir, _, results = run
    page = (run_dir / "report.html").read_text()
    assert page.count("<li><strong>") == len(results["settings"]) == 2


# ---- command line ----------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*POTSTILL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_distill_runs_a_recipe_file(tmp_path):
    recipe = _recipe_file(tmp_path)
    out = tmp_path / "cli-run"
    proc = _cli(
        "distill",
        str(recipe),
        "--out",
        str(out),
        "--set",
        "baseline=false",
        "--set",
        "settings=[{name: only}]",
        "--set",
        "train.epochs=1",
        "--set",
        "evaluation.measure_cache_speedup=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'report.md'}" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["settings"]] == ["only"]
    assert set(results["settings"][0]["runs"]) == {"distilled"}
    assert results["settings"][0]["runs"]["distilled"]["steps"] == 18
    assert "student without teacher" not in (out / "report.md").read_text()
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["baseline"] is False and saved["train"]["epochs"] == 1


def test_cli_bad_override_exits_2_naming_the_field(tmp_path):
    recipe = _recipe_file(tmp_path)
    proc = _cli(
        "distill",
        str(recipe),
        "--out",
        str(tmp_path / "x"),
        "--set",
        "train.optimizer.lr=-1",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "train.optimizer.lr" in proc.stderr
    assert "greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "x").exists()


def test_cli_eval_and_report_of_a_finished_run(run, tmp_path):
    run_dir, _, results = run
    row = results["settings"][0]["runs"]["distilled"]
    proc = _cli(
        "eval",
        str(run_dir / "few-labels" / "distilled" / "final"),
        "--data",
        "digits",
        "--teacher",
        str(run_dir / "teacher" / "final"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["accuracy"] == row["accuracy"]
    assert figures["agreement"] == row["agreement"]
    assert figures["parameters"] == row["parameters"]

    (run_dir / "report.html").unlink()
    proc = _cli("report", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()

    proc = _cli("report", str(tmp_path / "nothing"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "results.json not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_teacher_path_exits_2_without_traceback(tmp_path):
    recipe = _recipe_file(tmp_path)
    proc = _cli(
        "distill",
        str(recipe),
        "--out",
        str(tmp_path / "x"),
        "--set",
        f"teacher.path={tmp_path / 'no-teacher'}",
        cwd=tmp_path,
    )
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.returncode == 2
    assert "no-teacher" in proc.stderr


def test_cli_lists_builtin_recipes(tmp_path):
    proc = _cli("recipes", cwd=tmp_path)
    assert proc.returncode == 0
    shipped = resources.files("potstill") / "recipes"
    assert [line.split()[0] for line in proc.stdout.splitlines()] == sorted(
        f.name.removesuffix(".yaml") for f in shipped.iterdir() if f.name.endswith(".yaml")
    )  # one line each, the name first (tests/test_cli.py checks the rest of the line)


# ---- the one-call API ------------------------------------------------------------------------


def test_api_distill_with_baseline(digits, teacher_model, tmp_path):
    student = make_mlp([16], seed=21)
    init = copy.deepcopy(student)
    result = potstill.distill(
        teacher_model,
        student,
        digits.train,
        eval_data=digits.val,
        epochs=2,
        batch_size=64,
        lr=2e-2,
        temperature=3.0,
        alpha=0.6,
        baseline=True,
        run_dir=tmp_path,
        progress=False,
    )
    assert result.student is student
    assert not state_equal(student, init)
    assert result.baseline is not None and result.baseline is not student
    assert result.fit.steps == 2 * 18
    assert [r["step"] for r in result.history][-1] == 36

    t_logits, labels = predict_logits(teacher_model, digits.val)
    pairs = ((result.student, result.metrics), (result.baseline, result.baseline_metrics))
    for model, metrics in pairs:
        logits, _ = predict_logits(model, digits.val)
        assert metrics == {
            "agreement": agreement(logits, t_logits),
            "accuracy": accuracy(logits, labels),
        }
    assert result.metrics["accuracy"] > 0.5

    # both equal a hand-written Distiller run from the same initial weights and budget
    cfg = quiet_config(
        epochs=2,
        batch_size=64,
        optimizer=OptimizerConfig(lr=2e-2),
        schedule=ScheduleConfig(name="cosine"),
    )
    distilled = Distiller(
        copy.deepcopy(init),
        hinton_objective(3.0, 0.6),
        digits.train,
        teacher=LiveTeacher(teacher_model),
        config=cfg,
    ).fit()
    baseline = Distiller(
        copy.deepcopy(init),
        labels_only_objective(),
        digits.train,
        config=cfg.model_copy(update={"max_steps": 36, "epochs": None}),
    ).fit()
    assert state_equal(distilled.student, result.student)
    assert state_equal(baseline.student, result.baseline)
    for sub in ("distilled", "baseline"):
        rows = [json.loads(x) for x in (tmp_path / sub / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in rows if "eval" not in r) == 36


def test_api_distill_with_cache_matches_live(digits, teacher_model, tmp_path):
    kw = dict(epochs=1, batch_size=64, lr=5e-3, progress=False)
    live = potstill.distill(teacher_model, make_mlp([16], seed=22), digits.train, **kw)
    cached = potstill.distill(
        teacher_model,
        make_mlp([16], seed=22),
        digits.train,
        cache_teacher=True,
        run_dir=tmp_path,
        **kw,
    )
    assert (tmp_path / "teacher-cache" / "manifest.json").exists()
    assert live.metrics == {} and live.baseline is None
    for (name, a), (_, b) in zip(
        live.student.state_dict().items(), cached.student.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


# ---- Fashion-MNIST end to end ----------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_default_recipe_end_to_end_small(tmp_path):
    recipe = load_recipe(
        "default",
        [
            "data.val_size=1000",
            "teacher.arch.hidden=[64]",
            "teacher.train.max_steps=60",
            "teacher.train.progress=false",
            "teacher.train.tensorboard=false",
            "train.max_steps=30",
            "train.progress=false",
            "train.tensorboard=false",
            "settings=[{name: few-labels, labelled_fraction: 0.05}]",
            "evaluation.measure_cache_speedup=false",
        ],
    )
    results = run_recipe(recipe, tmp_path / "run")
    assert results["data"] == {"name": "fashion-mnist", "train": 59000, "val": 1000, "test": 10000}
    assert 0.3 < results["teacher"]["accuracy"] <= 1  # chance is 0.1
    (setting,) = results["settings"]
    assert setting["transfer_examples"] == 59000
    assert abs(setting["labelled_examples"] - 0.05 * 59000) <= 10  # 5% of each class
    for row in setting["runs"].values():
        assert 0 < row["accuracy"] <= 1
        assert row["steps"] == 30
        assert row["parameters"] == 784 * 32 + 32 + 32 * 10 + 10
    assert (tmp_path / "run" / "report.html").exists()


def test_classic_results_header_report_and_model_cards(run):
    run_dir, recipe, results = run
    assert_results_header(results, "classic")
    assert_report_rebuilds(run_dir)
    for setting in results["settings"]:
        for kind, row in setting["runs"].items():
            card, meta = read_card(run_dir / setting["name"] / kind / "final", recipe)
            assert card.startswith(f"# {recipe.name}: {setting['name']}, {kind}")
            assert meta.pipeline_tag == "image-classification" and meta.library_name is None
            assert card_metric(meta, "accuracy") == pytest.approx(row["accuracy"])
            assert meta.base_model is None  # a built-in MLP: no hub model behind it
            assert f"Test accuracy {100 * row['accuracy']:.2f}%" in card
            assert ("no teacher" in card) == (kind == "baseline")
            assert f"| steps | {row['steps']} |" in card


def test_a_second_process_cannot_run_in_the_same_folder(tmp_path):
    from potstill.runs.folder import RunFolder

    recipe = load_recipe("default")
    with RunFolder(tmp_path / "run", recipe):
        with pytest.raises(RecipeError, match=r"is in use by a potstill run \(pid \d+"):
            RunFolder(tmp_path / "run", recipe)
    RunFolder(tmp_path / "run", recipe).close()  # free again once the first one is done
