"""potstill's training step against a hand-written PyTorch distillation loop doing the same work.

Same teacher and student (the default recipe's 784-1024-1024 MLP teacher, live, and 784-32 MLP
student), same batches, same loss (Hinton, T=4, alpha=0.7), AdamW, cosine schedule, same threads.
Runs alternate (A B A B …) after a warm-up; each run times ``--steps`` optimizer steps. Prints the
median time per step of each and the median of the per-round ratios potstill / hand-written
(goal: ≤ 1.05).

    python benchmarks/overhead.py [--steps 300] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from potstill import Distiller, LiveTeacher, TrainConfig
from potstill.config import OptimizerConfig, ScheduleConfig
from potstill.data.images import load_fashion_mnist
from potstill.losses.terms import hinton_objective
from potstill.models import ArchSpec, build_model

T, ALPHA, BATCH, LR = 4.0, 0.7, 128, 3e-3


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = build_model(ArchSpec(hidden=[1024, 1024], dropout=0.2)).eval().requires_grad_(False)
    student = build_model(ArchSpec(hidden=[32]))
    return teacher, student


def hand_written(teacher, student, x, y, steps: int) -> float:
    """The loop a user would write: no objects, no logging. Returns seconds per step."""
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    student.train()
    t0 = time.perf_counter()
    for i in range(steps):
        idx = order[(i * BATCH) % (len(x) - BATCH) :][:BATCH]
        xb, yb = x[idx], y[idx]
        with torch.no_grad():
            t_logits = teacher(xb)
        s_logits = student(xb)
        kd = (
            F.kl_div(
                F.log_softmax(s_logits / T, -1),
                F.log_softmax(t_logits / T, -1),
                reduction="batchmean",
                log_target=True,
            )
            * T
            * T
        )
        loss = ALPHA * kd + (1 - ALPHA) * F.cross_entropy(s_logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return (time.perf_counter() - t0) / steps


def with_potstill(teacher, student, dataset, steps: int) -> float:
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=BATCH,
        progress=False,
        tensorboard=False,
        optimizer=OptimizerConfig(name="adamw", lr=LR),
        schedule=ScheduleConfig(name="cosine"),
        eval_every=10**9,
    )
    d = Distiller(
        student, hinton_objective(T, ALPHA), dataset, teacher=LiveTeacher(teacher), config=cfg
    )
    t0 = time.perf_counter()
    d.fit()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    train, _ = load_fashion_mnist()
    x, y = train.tensors
    teacher, student0 = models()
    import copy

    times: dict[str, list[float]] = {"hand-written": [], "potstill": []}
    hand_written(teacher, copy.deepcopy(student0), x, y, 30)  # warm-up
    with_potstill(teacher, copy.deepcopy(student0), train, 30)
    for _ in range(args.rounds):
        times["hand-written"].append(
            hand_written(teacher, copy.deepcopy(student0), x, y, args.steps)
        )
        times["potstill"].append(with_potstill(teacher, copy.deepcopy(student0), train, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    # each round's two runs sit side by side in time: their ratio cancels the machine's drift
    ratios = [p / h for p, h in zip(times["potstill"], times["hand-written"], strict=True)]
    ratio = statistics.median(ratios)
    print(
        f"threads={torch.get_num_threads()} batch={BATCH} steps/run={args.steps} "
        f"rounds={args.rounds}"
    )
    for k, v in times.items():
        print(
            f"{k:>13}: median {1e3 * med[k]:.3f} ms/step  (min {1e3 * min(v):.3f}, "
            f"max {1e3 * max(v):.3f})"
        )
    print(
        f"ratio potstill / hand-written: {ratio:.3f}  (median of per-round ratios "
        f"{min(ratios):.3f}…{max(ratios):.3f}; goal ≤ 1.05)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "ms_per_step": {k: [1e3 * t for t in v] for k, v in times.items()},
                    "ratio": ratio,
                    "threads": torch.get_num_threads(),
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
