"""A Distiller run for tests/test_distributed.py, started by torchrun (or in-process): a seeded
MLP teacher and student on scikit-learn digits, Hinton's objective with a few labels, optional
stop after a step (an interruption) and resume, DDP or FSDP. Rank 0 saves the final student.

    torchrun --nproc-per-node 2 tests/dist_worker.py OUT [--stop-after N] [--resume] [--fsdp]
        [--shard-teacher] [--batch-size B] [--grad-accum A]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_model

from potstill import distributed
from potstill.config import TrainConfig
from potstill.data.splits import hide_labels, load_splits
from potstill.distiller import Distiller
from potstill.losses.terms import hinton_objective
from potstill.models import ArchSpec, build_model
from potstill.teachers import LiveTeacher


class Stop(Exception):
    """Raised by the callback: the run is interrupted after a step."""


def _sizes(model: torch.nn.Module) -> dict[str, list]:
    """name → [is a DTensor, local numel, full numel] for each parameter of ``model``."""
    from torch.distributed.tensor import DTensor

    return {
        name: [isinstance(p, DTensor), (p.to_local() if isinstance(p, DTensor) else p).numel(),
               p.numel()]
        for name, p in model.named_parameters()
    }  # fmt: skip


def run(out: Path, *, stop_after: int | None = None, resume: bool = False, fsdp: bool = False,
        batch_size: int = 64, grad_accum: int = 1, shard_teacher: bool = False,
        ) -> torch.nn.Module:  # fmt: skip
    splits = load_splits("digits", val_size=158)  # 1,280 training examples: 20 batches of 64
    train = hide_labels(splits.train, 0.3, seed=0)
    arch = ArchSpec(hidden=[48, 24], input_shape=list(splits.input_shape), num_classes=10)
    torch.manual_seed(1)
    teacher = build_model(arch.model_copy(update={"hidden": [96]}))
    torch.manual_seed(0)
    student = build_model(arch)
    cfg = TrainConfig(
        max_steps=30, batch_size=batch_size, grad_accum=grad_accum, clip_grad_norm=1.0,
        checkpoint_every=10, eval_every=10, log_every=5, progress=False, tensorboard=False,
        distributed="fsdp" if fsdp else "ddp",
    )  # fmt: skip

    def stop(step: int, row: dict) -> None:
        if stop_after is not None and step == stop_after:
            raise Stop(f"stopped after step {step}")

    def placement(step: int, row: dict) -> None:
        """After the first step: each parameter's local and full sizes, per model and rank
        (an FSDP2 shard is a DTensor holding a part of the full tensor)."""
        if step == 1:
            (out / f"placement-rank{distributed.rank()}.json").write_text(json.dumps({
                "student": _sizes(student), "teacher": _sizes(teacher)
            }))  # fmt: skip

    fit = Distiller(
        student, hinton_objective(2.0, 0.7), train, config=cfg, run_dir=out,
        teacher=LiveTeacher(teacher, shard=shard_teacher), callbacks=[stop, placement],
        evaluate=lambda m: {"loss_probe": float(m(splits.val.tensors[0]).std())},
    ).fit(resume=resume)  # fmt: skip
    if distributed.is_main():
        save_model(fit.student, str(out / "final.safetensors"))
    return fit.student


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--stop-after", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--shard-teacher", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    try:
        run(a.out, stop_after=a.stop_after, resume=a.resume, fsdp=a.fsdp, batch_size=a.batch_size,
            grad_accum=a.grad_accum, shard_teacher=a.shard_teacher)  # fmt: skip
    except Stop as e:
        print(e)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
