"""Distributed training throughput on this machine: 2 processes (torchrun, gloo, DDP, one
thread each) against 1 process (two threads), the same global batch, measured in one sitting.

Workloads, each trained by the same :class:`potstill.Distiller`:

* ``mlp``: Fashion-MNIST, a 784-1024-1024-10 MLP teacher (random weights: speed only) into a
  784-128-10 student, Hinton's objective, batches of 256 images, AdamW.
* ``smollm2``: SmolLM2-135M-Instruct (live teacher, 30 layers) into a 10-layer student derived
  from it, forward KL on the ``smollm2-fortunes`` data, batches of 8 sequences (≤ 96 tokens),
  AdamW, chunk size 1024 (the built-in recipe's settings).

Each run trains ``warm-up + steps`` steps; examples/s counts only the steps after the warm-up
(timed by a step callback, so start-up, model loading and the DDP set-up are left out). Runs
alternate (1 process, 2 processes, 1, 2, …) for ``--rounds`` rounds; the table gives the median
examples/s of each and the median of the per-round ratios (2 processes / 1) with their spread.

    .venv/bin/python benchmarks/distributed.py                  # about 6 minutes on 2 cores
    .venv/bin/python benchmarks/distributed.py --workloads mlp --rounds 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STEPS = {"mlp": (60, 10), "smollm2": (8, 2)}  # (measured steps, warm-up steps)


def worker(workload: str, steps: int, warmup: int, out: Path) -> None:
    """Train one workload; rank 0 writes {examples_per_s, processes, threads} to ``out``."""
    from potstill import Distiller, distributed
    from potstill.config import TrainConfig
    from potstill.losses.objective import Objective
    from potstill.losses.terms import hinton_objective
    from potstill.teachers import LiveTeacher

    rank, world = distributed.setup()
    cfg = dict(max_steps=steps + warmup, progress=False, tensorboard=False, log_every=10**6,
               eval_every=10**6, optimizer={"name": "adamw", "lr": 3e-4})  # fmt: skip
    if workload == "mlp":
        from potstill.data.splits import load_splits
        from potstill.models import ArchSpec, build_model

        splits = load_splits("fashion-mnist")
        arch = ArchSpec(hidden=[128], input_shape=[1, 28, 28], num_classes=10)
        torch.manual_seed(0)
        teacher = build_model(arch.model_copy(update={"hidden": [1024, 1024]})).eval()
        student, train = build_model(arch), splits.train
        objective, source = hinton_objective(2.0, 0.5), LiveTeacher(teacher)
        config = TrainConfig(batch_size=256, **cfg)
        forward: dict = {}
    else:
        from potstill.llm.forward import causal_lm_forward
        from potstill.losses.terms import token_term
        from potstill.recipe import load_recipe
        from potstill.runs.lm_data import lm_datasets, load_lm_teacher
        from potstill.students import derive

        recipe = load_recipe("smollm2-fortunes")
        teacher, tok = load_lm_teacher(recipe)
        train, _, _ = lm_datasets(recipe, tok)
        torch.manual_seed(0)
        student = derive(teacher, keep=10)
        objective = Objective([token_term("fkl", chunk_size=recipe.chunk_size)])
        source = LiveTeacher(teacher, forward=causal_lm_forward)
        config = TrainConfig(batch_size=8, **cfg)
        forward = {"student_forward": causal_lm_forward}
    times: list[float] = []
    Distiller(
        student, objective, train, teacher=source, config=config,
        callbacks=[lambda step, row: times.append(time.perf_counter())], **forward,
    ).fit()  # fmt: skip
    if rank == 0:
        rate = steps * config.batch_size / (times[-1] - times[warmup - 1])
        result = {"examples_per_s": rate, "processes": world, "threads": torch.get_num_threads()}
        out.write_text(json.dumps(result))


def launch(workload: str, processes: int, threads: int, folder: Path) -> float:
    steps, warmup = STEPS[workload]
    out = folder / f"{workload}-{processes}.json"
    args = [__file__, "--worker", workload, "--steps", str(steps), "--warmup", str(warmup),
            "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(processes), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())["examples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["mlp", "smollm2"], choices=list(STEPS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cores", type=int, default=2, help="threads of the 1-process run")
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--worker", choices=list(STEPS), help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        worker(a.worker, a.steps, a.warmup, a.out)
        return
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in a.workloads:
            one, two = [], []
            for r in range(a.rounds):
                one.append(launch(workload, 1, a.cores, Path(tmp)))
                two.append(launch(workload, 2, max(1, a.cores // 2), Path(tmp)))
                print(f"{workload} round {r + 1}: 1 process {one[-1]:.1f} ex/s, "
                      f"2 processes {two[-1]:.1f} ex/s", flush=True)  # fmt: skip
            ratios = [b / x for x, b in zip(one, two, strict=True)]
            results[workload] = {"one": one, "two": two, "ratios": ratios}
    print(f"\n{a.cores} cores, torch {torch.__version__}, {a.rounds} rounds, "
          f"{(time.perf_counter() - t0) / 60:.1f} min\n")  # fmt: skip
    print("| workload | 1 process (examples/s) | 2 processes (examples/s) | ratio (spread) |")
    print("|---|---|---|---|")
    for workload, r in results.items():
        print(f"| {workload} | {statistics.median(r['one']):,.1f} | "
              f"{statistics.median(r['two']):,.1f} | {statistics.median(r['ratios']):.2f}× "
              f"({min(r['ratios']):.2f}–{max(r['ratios']):.2f}) |")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
