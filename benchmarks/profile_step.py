"""Where potstill's LLM distillation step spends its time: torch.profiler over a few steps of
the ``benchmarks/vs_trl.py`` setup (SmolLM2-135M-Instruct live teacher → 10-layer derived
student, batch 4 × 64 tokens, forward KL, AdamW, clipping), grouped into the step's phases
(teacher forward, student forward, loss, backward, clipping, optimizer) and the top operators.

    .venv/bin/python benchmarks/profile_step.py            # about 1 minute on 2 cores
    .venv/bin/python benchmarks/profile_step.py --cached   # from a top-64 teacher cache
    .venv/bin/python benchmarks/profile_step.py --parts    # the pieces timed one by one

``--parts`` times the pieces the profile pointed at, each the median of 5 after a warm-up: the
teacher's forward (fp32 with and without the key/value cache, under ``no_grad`` and
``inference_mode``, and cast to bf16), the student's forward + backward with and without the
cache, one AdamW step (torch's default multi-tensor form and the fused kernel), and a
2048² matrix product in fp32 and bf16.
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
    p.add_argument("--parts", action="store_true", help="time the pieces one by one instead")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.parts:
        parts()
        return
    from potstill import Distiller
    from potstill.cache import CachedTeacher
    from potstill.config import TrainConfig
    from potstill.llm.forward import causal_lm_forward
    from potstill.losses.objective import Objective
    from potstill.losses.terms import token_term
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


def median_ms(fn, repeats: int = 5) -> float:
    """Median of ``repeats`` timed calls after one warm-up, milliseconds."""
    from potstill.evaluate import median_seconds

    return median_seconds(fn, repeats) * 1000


def parts() -> None:
    import copy

    teacher, student, _, input_ids = vs_trl.setup(vs_trl.BATCH)
    x = input_ids[: vs_trl.BATCH]
    rows = []
    with torch.no_grad():
        rows.append(("teacher forward, fp32", median_ms(lambda: teacher(input_ids=x))))
        rows.append(("teacher forward, fp32, use_cache=False",
                     median_ms(lambda: teacher(input_ids=x, use_cache=False))))  # fmt: skip
    with torch.inference_mode():
        rows.append(("teacher forward, fp32, use_cache=False, inference_mode",
                     median_ms(lambda: teacher(input_ids=x, use_cache=False))))  # fmt: skip
    bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    with torch.no_grad():
        rows.append(("teacher forward, bf16 weights, use_cache=False",
                     median_ms(lambda: bf16(input_ids=x, use_cache=False))))  # fmt: skip

    def student_step(use_cache: bool) -> None:
        student(input_ids=x, use_cache=use_cache).logits.float().mean().backward()

    rows.append(("student forward + backward", median_ms(lambda: student_step(True))))
    rows.append(("student forward + backward, use_cache=False",
                 median_ms(lambda: student_step(False))))  # fmt: skip
    for fused in (False, True):
        opt = torch.optim.AdamW(student.parameters(), lr=vs_trl.LR, fused=fused or None)
        name = "fused" if fused else "default (multi-tensor)"
        rows.append((f"AdamW step, {name}", median_ms(opt.step)))
    n = 2048
    for dtype in (torch.float32, torch.bfloat16):
        m1, m2 = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        ms = median_ms(lambda m1=m1, m2=m2: m1 @ m2)
        rows.append((f"{n}² matrix product, {dtype} ({2 * n**3 / ms / 1e6:.0f} GFLOP/s)", ms))
    print(f"{torch.get_num_threads()} threads, batch {vs_trl.BATCH} × {vs_trl.LENGTH} tokens\n")
    print("| piece | ms (median of 5) |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.0f} |")


if __name__ == "__main__":
    main()
