"""Teacher assistant for an LLM: SmolLM2-135M-Instruct (30 layers) into an 8-layer student
derived from it, directly vs through a 15-layer assistant (potstill.stages.plan_layers(30, 8)),
at equal total steps.

Data and settings are the ``smollm2-fortunes`` recipe's (fortunes as chat answers, prompts
masked, batches of 8, AdamW 3e-4 cosine, chunk 1024), forward KL to the teacher. Direct: the
student trains ``2 × --steps`` steps against the teacher. Chain: the assistant (15 of the
teacher's layers, weights copied) trains ``--steps`` against the teacher, then the student
(8 of the teacher's layers, the same initial weights as the direct one) trains ``--steps``
against the trained assistant. Held-out perplexity, top-1 agreement and KL to the teacher on
the recipe's 120 held-out fortunes. The two paths cost different compute per step (the
assistant is larger than the student, the assistant is a cheaper teacher than the teacher);
wall times are printed.

    .venv/bin/python benchmarks/llm_assistant.py               # about 12 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from potstill import Distiller
from potstill.llm.evaluate import lm_figures
from potstill.llm.forward import causal_lm_forward
from potstill.losses.objective import Objective
from potstill.losses.terms import token_term
from potstill.recipe import load_recipe
from potstill.runs.lm_data import lm_datasets, load_lm_teacher
from potstill.stages import plan_layers
from potstill.students import derive
from potstill.teachers import LiveTeacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per stage (direct: 2×)")
    parser.add_argument("--student-layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    recipe = load_recipe("smollm2-fortunes")
    teacher, tok = load_lm_teacher(recipe)
    train, val, _ = lm_datasets(recipe, tok)
    layers = teacher.config.num_hidden_layers
    (mid,) = plan_layers(layers, args.student_layers)
    objective = Objective([token_term("fkl", chunk_size=recipe.chunk_size)])

    def fit(student, source, steps, seed):
        cfg = recipe.train.model_copy(update={"max_steps": steps, "progress": False, "seed": seed})
        t = time.perf_counter()
        out = Distiller(
            student, objective, train, teacher=LiveTeacher(source, forward=causal_lm_forward),
            config=cfg, student_forward=causal_lm_forward,
        ).fit().student  # fmt: skip
        print(f"  trained {student.config.num_hidden_layers} layers for {steps} steps against "
              f"{source.config.num_hidden_layers} layers: {time.perf_counter() - t:.0f} s",
              flush=True)  # fmt: skip
        return out, time.perf_counter() - t

    torch.manual_seed(recipe.seed)
    start = derive(teacher, keep=args.student_layers)
    assistant0 = derive(teacher, keep=mid)
    direct, t_direct = fit(copy.deepcopy(start), teacher, 2 * args.steps, recipe.seed)
    assistant, t_a = fit(assistant0, teacher, args.steps, recipe.seed)
    via, t_via = fit(copy.deepcopy(start), assistant, args.steps, recipe.seed)
    models = {
        "teacher": teacher,
        f"derived {args.student_layers} layers, not distilled": start,
        f"direct ({2 * args.steps} steps from the teacher)": direct,
        f"assistant, {mid} layers ({args.steps} steps from the teacher)": assistant,
        f"through the assistant ({args.steps} + {args.steps} steps)": via,
    }
    figures = lm_figures(models, val, teacher=teacher, batch_size=recipe.eval_batch_size)
    print("\n| model | perplexity | top-1 agreement | KL(teacher‖model) |")
    print("|---|---|---|---|")
    for name, f in figures.items():
        print(f"| {name} | {f['perplexity']:,.1f} | {f['top1_agreement']:.3f} | "
              f"{f['kl_to_teacher']:.3f} |")  # fmt: skip
    wall = (time.perf_counter() - t0) / 60
    print(f"\ntrain time: direct {t_direct:.0f} s; chain {t_a:.0f} + {t_via:.0f} s. "
          f"Wall time {wall:.1f} min, {args.threads} threads.")  # fmt: skip


if __name__ == "__main__":
    main()
