"""Runs that survive faults (the fault issue, in pieces): files are written with the mode the
user's umask gives (a shared cache or run folder is readable by the others), ..."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from potstill.io import (
    atomic_create_text,
    atomic_save_module,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_text,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process's umask for one test (restored after)."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_every_atomic_writer_respects_the_umask(tmp_path, umask, mask):
    umask(mask)
    want = 0o666 & ~mask  # what open() gives a new file
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(plain) == want
    written = [
        atomic_write_text(tmp_path / "a.txt", "x"),
        atomic_save_module(nn.Linear(2, 2), tmp_path / "m.safetensors"),
        atomic_save_safetensors({"t": torch.ones(2)}, tmp_path / "t.safetensors"),
        atomic_torch_save({"t": torch.ones(2)}, tmp_path / "s.pt"),
    ]
    assert atomic_create_text(tmp_path / "c.txt", "x")
    written.append(tmp_path / "c.txt")
    assert {p.name: _mode(p) for p in written} == {p.name: want for p in written}


def test_a_whole_run_folder_is_readable_by_the_group_and_others(tmp_path, umask):
    """Under the common umask 022 every file of a classic run (recipe, results, weights,
    checkpoints, teacher-cache shards, reports) is 0644, as the other accounts of a shared
    folder need."""
    from test_gpu_road import DIGITS

    from potstill.recipe import validate_recipe
    from potstill.runs import run

    umask(0o022)
    run(validate_recipe({**DIGITS, "device": "cpu"}), tmp_path / "run")
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".potstill.lock"]
    assert len(files) > 20
    wrong = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files if _mode(p) != 0o644}
    assert not wrong


# --- fallback checkpoints ------------------------------------------------------------------


def _fit(digits, run_dir, *, stop_at=None, resume=False, kept=2):
    from conftest import make_mlp, quiet_config

    from potstill.distiller import Distiller
    from potstill.losses.terms import hinton_objective
    from potstill.teachers import LiveTeacher

    cfg = quiet_config(max_steps=6, batch_size=64, eval_every=2, checkpoint_every=1,
                       checkpoints_kept=kept)  # fmt: skip
    d = Distiller(make_mlp([16], dropout=0.2, seed=8), hinton_objective(4.0, 0.5),
                  digits.train, teacher=LiveTeacher(make_mlp([32], seed=1)), config=cfg,
                  run_dir=run_dir)  # fmt: skip

    def stop(step, row):
        if step == stop_at:
            raise KeyboardInterrupt

    d.callbacks.append(stop)
    try:
        return d.fit(resume=resume)
    except KeyboardInterrupt:
        return None


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: _flip_a_byte(f / "student.safetensors"),
        lambda f: (f / "trainer_state.pt").write_bytes((f / "trainer_state.pt").read_bytes()[:50]),
        lambda f: (f / "meta.json").unlink(),
        lambda f: (f / "meta.json").write_text("{not json"),
    ],
    ids=["flipped-weights", "truncated-state", "no-meta", "damaged-meta"],
)
def test_a_damaged_newest_checkpoint_falls_back_and_resumes_bitwise(digits, tmp_path, damage,
                                                                    caplog):  # fmt: skip
    from conftest import state_equal

    whole = _fit(digits, tmp_path / "whole")
    assert _fit(digits, tmp_path / "cut", stop_at=5) is None
    root = tmp_path / "cut" / "checkpoints"
    assert [p.name for p in sorted(root.glob("step-*"))] == ["step-00000003", "step-00000004"]
    damage(root / "step-00000004")
    with caplog.at_level("WARNING", logger="potstill"):
        resumed = _fit(digits, tmp_path / "cut", resume=True)
    assert "step-00000004" in caplog.text and "falling back to step-00000003" in caplog.text
    assert resumed is not None and state_equal(resumed.student, whole.student)
    assert resumed.history[-1] == {**whole.history[-1], "examples_per_s":
                                   resumed.history[-1]["examples_per_s"]}  # fmt: skip
    assert (root / "damaged-step-00000004").is_dir()  # kept aside for a look, not deleted
    assert [p.name for p in sorted(root.glob("step-*"))] == ["step-00000005", "step-00000006"]


def test_no_intact_checkpoint_trains_the_model_again_from_its_start(digits, tmp_path, caplog):
    """Every checkpoint damaged (or a kill during the first one): that model starts over,
    warned naming each, and ends as an uninterrupted run; nothing else is lost."""
    from conftest import state_equal

    whole = _fit(digits, tmp_path / "whole")
    _fit(digits, tmp_path / "cut", stop_at=5)
    root = tmp_path / "cut" / "checkpoints"
    for step in (3, 4):
        _flip_a_byte(root / f"step-{step:08d}" / "student.safetensors")
    with caplog.at_level(logging.WARNING, "potstill"):
        resumed = _fit(digits, tmp_path / "cut", resume=True)
    for step in (3, 4):
        assert f"step-{step:08d}" in caplog.text
    assert "falling back to the start of this model's training" in caplog.text
    assert resumed is not None and state_equal(resumed.student, whole.student)
    assert (root / "damaged-step-00000004").is_dir()
    assert (root / "damaged-step-00000003").is_dir()


# --- verified reuse ------------------------------------------------------------------------


def test_a_seal_names_each_kind_of_damage(tmp_path):
    from potstill.sealed import SUMS_FILE, DamagedFolder, damage, seal, verify

    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "pool.json").write_text("{}")
    seal(folder)
    (folder / "README.md").write_text("a card written later")  # not sealed: reports rewrite it
    lines = (folder / SUMS_FILE).read_text().splitlines()
    assert [ln.split("  ")[1] for ln in lines] == ["config.json", "model.safetensors",
                                                  "sub/pool.json"]  # fmt: skip
    assert damage(folder) == []
    verify(folder)
    _flip_a_byte(folder / "model.safetensors")
    (folder / "sub" / "pool.json").unlink()
    (folder / "extra.safetensors").write_bytes(b"x")
    problems = damage(folder)
    assert len(problems) == 3
    assert "model.safetensors differs from its checksum" in problems[0]
    assert "sub/pool.json is missing" in problems[1]
    assert "extra.safetensors is not in SHA256SUMS" in problems[2]
    with pytest.raises(DamagedFolder, match="model folder .*model.safetensors differs.*sha256sum"):
        verify(folder)
    (folder / SUMS_FILE).write_text("garbage\n")
    assert "is not a checksum line" in damage(folder)[0]


def test_the_seal_is_the_one_sha256sum_checks(tmp_path):
    """``sha256sum -c SHA256SUMS`` (coreutils) accepts an intact seal and fails a damaged one."""
    import shutil
    import subprocess

    from potstill.sealed import SUMS_FILE, seal

    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum here")
    (tmp_path / "a.bin").write_bytes(b"abc" * 1000)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c.json").write_text("{}")
    seal(tmp_path)
    check = ["sha256sum", "-c", "--quiet", SUMS_FILE]
    assert subprocess.run(check, cwd=tmp_path).returncode == 0
    _flip_a_byte(tmp_path / "a.bin")
    assert subprocess.run(check, cwd=tmp_path, capture_output=True).returncode != 0


def test_a_damaged_hf_export_is_refused_by_the_loader(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from potstill.hf import export_pretrained, load_model
    from potstill.sealed import DamagedFolder

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    out = export_pretrained(LlamaForCausalLM(cfg), tmp_path / "export")
    assert (out / "SHA256SUMS").exists()
    load_model(out, "causal-lm")  # intact: loads
    _flip_a_byte(out / "model.safetensors")
    with pytest.raises(DamagedFolder, match=r"export/model.safetensors differs"):
        load_model(out, "causal-lm")


def _classic(tmp_path, name="run", **changes):
    from test_gpu_road import DIGITS

    from potstill.recipe import validate_recipe
    from potstill.runs import run

    def go(resume=False):
        data = {**DIGITS, "device": "cpu", **changes}
        return run(validate_recipe(data), tmp_path / name, resume=resume)

    return go


def _figures(results):
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k
             and "latency" not in k and "throughput" not in k}
            for s in results["settings"] for r in s["runs"].values()]  # fmt: skip


def test_a_damaged_finished_teacher_is_rebuilt_not_reused_and_the_cache_kept(tmp_path, caplog):
    """The issue's case: one flipped byte in ``teacher/final/model.safetensors``. On --resume the
    teacher is rebuilt from its last checkpoint (to the same bytes), the teacher cache made
    from the intact teacher is still the truth (not rebuilt), and the results are the same."""
    from potstill.io import sha256_file

    go = _classic(tmp_path)
    first = go()
    folder = tmp_path / "run"
    weights = folder / "teacher" / "final" / "model.safetensors"
    digest = sha256_file(weights)
    shards = {p: sha256_file(p) for p in (folder / "teacher" / "cache-train").rglob("*") if
              p.is_file()}  # fmt: skip
    assert shards
    _flip_a_byte(weights)
    with caplog.at_level("INFO", logger="potstill"):
        again = go(resume=True)
    assert "teacher: finished earlier, but" in caplog.text
    assert "teacher/final/model.safetensors differs from its checksum" in caplog.text
    assert sha256_file(weights) == digest
    assert {p: sha256_file(p) for p in shards} == shards
    assert "rebuilding the teacher cache" not in caplog.text.lower()
    assert _figures(again) == _figures(first)


def test_a_damaged_best_copy_is_named_and_rebuilt_from_the_first_step(tmp_path, caplog):
    """``best/`` (the weights at the best evaluation) is sealed and verified when its finished
    part is reused; damaged, the part trains again from its first step (its checkpoints are
    past the best evaluation) to the same bytes, best copy and export alike."""
    from potstill.io import sha256_file

    go = _classic(tmp_path)
    first = go()
    part = tmp_path / "run" / "teacher"
    best = part / "best"
    assert "best" in json.loads((part / "done.json").read_text())["sealed"]
    files = {p: sha256_file(p) for p in [*best.iterdir(), part / "final" / "model.safetensors"]}
    assert best / "SHA256SUMS" in files and best / "student.safetensors" in files
    _flip_a_byte(best / "student.safetensors")
    with caplog.at_level("INFO", logger="potstill"):
        again = go(resume=True)
    assert "teacher/best/student.safetensors differs from its checksum" in caplog.text
    assert "rebuilding it from the first step" in caplog.text
    assert "distilled: finished earlier, reusing" in caplog.text  # only the damaged part
    assert {p: sha256_file(p) for p in files} == files
    assert _figures(again) == _figures(first)


def test_a_teacher_path_to_a_damaged_export_stops_with_the_fix(tmp_path):
    """A shared part (another run's exported teacher) is not rebuilt: the run stops at once,
    exit 2, naming the file and what to do."""
    from typer.testing import CliRunner

    from potstill.cli import app

    _classic(tmp_path, "first")()
    teacher = tmp_path / "first" / "teacher" / "final"
    _flip_a_byte(teacher / "model.safetensors")
    recipe = tmp_path / "second.yaml"
    import yaml
    from test_gpu_road import DIGITS

    recipe.write_text(yaml.safe_dump({**DIGITS, "teacher": {"path": str(teacher)}}))
    out = CliRunner().invoke(app, ["distill", str(recipe), "--out", str(tmp_path / "second")])
    assert out.exit_code == 2, out.output
    assert "model.safetensors differs from its checksum" in out.output
    assert "Restore the folder" in out.output


def test_a_damaged_answers_line_is_answered_again_or_refused(tmp_path, caplog):
    from potstill.llm.answers import _existing, read_answers, record_check

    recs = [{"id": str(i), "answer": f"answer {i}"} for i in range(4)]
    for r in recs:
        r["check"] = record_check(r)
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert read_answers(path) == recs
    text = path.read_text().replace("answer 2", "answer X")
    path.write_text(text)
    with pytest.raises(ValueError, match=r"answers.jsonl:3: its checksum differs"):
        read_answers(path)
    with caplog.at_level("WARNING", logger="potstill"):
        kept = _existing(path, repair=True)
    assert kept == recs[:2]
    assert read_answers(path) == recs[:2]
    assert (tmp_path / "answers.jsonl.damaged").read_text() == text  # nothing lost
    assert "kept the 2 records before it" in caplog.text
