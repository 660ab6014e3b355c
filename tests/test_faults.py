"""Runs that survive faults (the fault issue, in pieces): files are written with the mode the
user's umask gives (a shared cache or run folder is readable by the others), ..."""

from __future__ import annotations

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


def test_no_intact_checkpoint_names_every_damaged_one(digits, tmp_path):
    from potstill.checkpoints import DamagedCheckpoint

    _fit(digits, tmp_path / "cut", stop_at=5)
    root = tmp_path / "cut" / "checkpoints"
    for step in (3, 4):
        _flip_a_byte(root / f"step-{step:08d}" / "student.safetensors")
    with pytest.raises(DamagedCheckpoint, match="no intact checkpoint.*step-00000004.*"
                       "step-00000003.*--overwrite"):  # fmt: skip
        _fit(digits, tmp_path / "cut", resume=True)
    assert (root / "step-00000004").is_dir()  # nothing moved or lost when the run stops
