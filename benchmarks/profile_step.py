"""Where potstill's LLM distillation step spends its time: torch.profiler over a few steps of
the ``benchmarks/vs_trl.py`` setup (SmolLM2-135M-Instruct live teacher → 10-layer derived
student, batch 4 × 64 tokens, forward KL, AdamW, clipping), grouped into the step's phases
(teacher forward, student forward, loss, backward, clipping, optimizer) and the top operators.

    .venv/bin/python benchmarks/profile_step.py            # about 1 minute on 2 cores
    .venv/bin/python benchmarks/profile_step.py --cached   # from a top-64 teacher cache
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
import vs_trl  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cached", action="store_true")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from potstill import Distiller
    from potstill.cache import CachedTeacher
    from potstill.config import TrainConfig
    from potstill.llm.evaluate import causal_lm_forward
    from potstill.losses.causal import token_term
    from potstill.losses.objective import Objective
    from potstill.teachers import LiveTeacher

    teacher, student, tok, input_ids = vs_trl.setup((a.steps + 2) * vs_trl.BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        if a.cached:
            source = CachedTeacher(vs_trl.write_cache_once(Path(tmp), len(input_ids)))
        else:
            live = LiveTeacher(teacher, forward=causal_lm_forward)

            class Timed:  # the teacher's forward as a named phase
                def signal(self, batch):
                    with record_function("phase: teacher forward"):
                        return live.signal(batch)

            source = Timed()

        def student_forward(model, batch):
            with record_function("phase: student forward"):
                return causal_lm_forward(model, batch)

        objective = Objective([token_term("fkl", chunk_size=1024)])
        fn = objective.terms[0].fn

        def loss_fn(view, signal, batch):
            with record_function("phase: loss (forward, gradient in closed form)"):
                return fn(view, signal, batch)

        objective.terms[0].fn = loss_fn
        config = TrainConfig(
            max_steps=a.steps + 2, batch_size=vs_trl.BATCH, shuffle=False, clip_grad_norm=1.0,
            optimizer={"name": "adamw", "lr": vs_trl.LR}, schedule={"name": "constant"},
            log_every=10**6, eval_every=10**6, progress=False, tensorboard=False,
        )  # fmt: skip
        distiller = Distiller(
            student, objective, vs_trl.lm_rows(input_ids), teacher=source, config=config,
            student_forward=student_forward,
        )  # fmt: skip
        warm = {"n": 0}

        def on_step(step, row):
            warm["n"] = step

        distiller.callbacks.append(on_step)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            distiller.fit()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    steps = a.steps + 2
    print(f"{steps} steps (2 of them warm-up, included), {wall / steps:.2f} s per step\n")
    print("| phase | ms per step |\n|---|---|")
    for e in sorted(events, key=lambda e: -e.cpu_time_total):
        if e.key.startswith("phase:"):
            print(f"| {e.key[7:]} | {e.cpu_time_total / 1e3 / steps:.0f} |")
    print("\n| operator | self ms per step | calls per step |\n|---|---|---|")
    ops = sorted(
        (e for e in events if not e.key.startswith("phase:")), key=lambda e: -e.self_cpu_time_total
    )
    for e in ops[: a.top]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / steps:.0f} | {e.count / steps:.0f} |")


if __name__ == "__main__":
    main()
