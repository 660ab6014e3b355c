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
