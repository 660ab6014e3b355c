"""Checkpoints of a training run for exact resume: the student's (and the objective's) weights in
safetensors and the trainer's state (optimizer, schedule, random generators, running logs) in a
``weights_only`` torch file, each written atomically, checksummed in ``meta.json`` and published
by rewriting ``checkpoints/last.json`` last. States are full (sharded FSDP tensors gathered), so a
run resumes under any number of processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .io import (
    atomic_save_module,
    atomic_torch_save,
    atomic_write_text,
    load_module,
    sha256_file,
)

CHECKPOINTS_DIR = "checkpoints"
"""A training folder's checkpoints, under it."""
BEST_DIR = "best"
"""A training folder's sealed copy of the weights at the best evaluation (``student.safetensors``,
``eval.json``); only a run from the start writes it again once the checkpoints are past it."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or belongs to another run."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint's files are incomplete or differ from their checksums."""


def write_checkpoint(
    run_dir: Path, step: int, student: nn.Module, objective: nn.Module, state: dict[str, Any],
    *, kept: int = 2,
) -> Path:  # fmt: skip
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` and make it the last one; once
    it is in force only the newest ``kept`` remain (the others are fallbacks for a damaged
    newest one). Returns its folder."""
    root = run_dir / CHECKPOINTS_DIR
    folder = root / f"step-{step:08d}"
    if folder.exists():
        shutil.rmtree(folder)
    atomic_save_module(student, folder / "student.safetensors")
    if any(True for _ in objective.parameters()):
        atomic_save_module(objective, folder / "objective.safetensors")
    atomic_torch_save(state, folder / "trainer_state.pt")
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    meta = {"step": step, "files": {f: sha256_file(folder / f) for f in files}}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
    atomic_write_text(root / "last.json", json.dumps({"dir": folder.name, "step": step}))
    for old in checkpoint_folders(run_dir)[kept:]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def newest_intact(
    run_dir: Path, total_steps: int
) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]] | None:
    """The newest checkpoint of ``run_dir`` whose files match their checksums, its trainer
    state, and the newer ones found damaged or incomplete (folder, why); None when there is no
    checkpoint; ``(None, None, damaged)`` when none is intact."""
    damaged: list[tuple[Path, str]] = []
    for folder in checkpoint_folders(run_dir):
        try:
            return folder, read_checkpoint(folder, total_steps), damaged
        except DamagedCheckpoint as e:
            damaged.append((folder, str(e)))
    return (None, None, damaged) if damaged else None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The checkpoint folders of ``run_dir``, newest first."""
    return sorted((run_dir / "checkpoints").glob("step-*"), reverse=True)


def read_checkpoint(folder: Path, total_steps: int) -> dict[str, Any]:
    """The trainer state of checkpoint ``folder``, after checking every file against
    ``meta.json`` and that it was written by a run of ``total_steps`` steps."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise DamagedCheckpoint(f"{meta_path} is missing: the checkpoint is incomplete")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise DamagedCheckpoint(f"{meta_path} is damaged ({e})") from e
    for fname, digest in meta["files"].items():
        if not (folder / fname).exists() or sha256_file(folder / fname) != digest:
            raise DamagedCheckpoint(
                f"checkpoint file {folder / fname} is missing or damaged "
                "(checksum differs from meta.json)"
            )
    # on the CPU: a run checkpointed on a GPU resumes on any device
    state = torch.load(folder / "trainer_state.pt", weights_only=True, map_location="cpu")
    if state["total_steps"] != total_steps:
        raise CheckpointError(
            f"checkpoint {folder} was written by a run of {state['total_steps']} steps, this "
            f"one has {total_steps}: resume with the same recipe, or start a new run dir"
        )
    return state


def load_weights(folder: Path, student: nn.Module, objective: nn.Module, *, fsdp: bool) -> None:
    """Checkpoint ``folder``'s weights into ``student`` (sharded in place by FSDP2 when
    ``fsdp``) and into ``objective`` when it has trainable parts."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = load_file(str(folder / "student.safetensors"))
        set_model_state_dict(student, full, options=StateDictOptions(full_state_dict=True))
    else:
        load_module(student, folder / "student.safetensors")
    if (folder / "objective.safetensors").exists():
        load_module(objective, folder / "objective.safetensors")


def full_optimizer_state(optimizer: torch.optim.Optimizer, *, fsdp: bool) -> dict[str, Any]:
    """The optimizer's state dict with every sharded (DTensor) tensor gathered and every tensor
    on the CPU: the same layout as a single process's on any device, whatever the number of
    processes (``load_state_dict`` puts each tensor back beside its parameter)."""
    state = optimizer.state_dict()
    if fsdp:
        from torch.distributed.tensor import DTensor

    def full(v: Any) -> Any:
        if fsdp and isinstance(v, DTensor):
            return v.full_tensor().cpu()
        return v.cpu() if isinstance(v, torch.Tensor) else v

    state["state"] = {i: {k: full(v) for k, v in st.items()} for i, st in state["state"].items()}
    return state


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], *, fsdp: bool
) -> None:
    """A full optimizer state back into ``optimizer`` (under FSDP, each tensor into this
    process's shard of its parameter)."""
    if fsdp:
        from torch.distributed.tensor import DTensor, distribute_tensor

        # state keys count the parameters group by group, as the optimizer holds them
        ordered = [p for g in optimizer.param_groups for p in g["params"]]
        for i, st in state["state"].items():
            p = ordered[int(i)]
            if isinstance(p, DTensor):
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        st[k] = distribute_tensor(
                            v.to(p.dtype if v.is_floating_point() else v.dtype),
                            p.device_mesh,
                            p.placements,
                        )
    optimizer.load_state_dict(state)


def truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop the rows of the metrics log ``path`` written after ``step`` (a resumed run logs them
    again); returns the training rows kept."""
    if not path.exists():
        return []
    keep, history = [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("eval", row)["step"] <= step:
            keep.append(line)
            if "eval" not in row:
                history.append(row)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return history
