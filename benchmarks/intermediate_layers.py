"""Intermediate-layer distillation on Fashion-MNIST: does matching more than the logits help?

The built-in recipe ``fashion-cnn`` (CNN teacher 16-32 channels, student 4-8 channels), one
teacher trained once (seed 0), then for each seed the student trained
- without a teacher (labels only),
- with logits only (KD T=2 + CE),
- with a FitNets hint stage first (feature MSE relu2 → relu2 through a 1×1-conv projector, one
  epoch), then the logits objective for the remaining epochs (same total steps),
- logits + attention transfer (relu1 and relu2 maps, weight 1000 as in Zagoruyko & Komodakis),
- logits + RKD (distance weight 25, angle weight 50 on the 32-d / 128-d embeddings, as in
  Park et al.),
all at the same budget (optimizer steps, batch). Prints and writes a table of test accuracy,
mean ± standard deviation over the seeds.

    python benchmarks/intermediate_layers.py [--seeds 0 1 2] [--epochs 4] [--out runs/intermediate]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from potstill.recipe import load_recipe
from potstill.runs import run as run_recipe

LOGITS = [{"kind": "kd", "weight": 0.5, "temperature": 2.0}, {"kind": "ce", "weight": 0.5}]
VARIANTS: dict[str, dict] = {
    "logits": {"objective": LOGITS},
    "hint + logits": {
        "objective": LOGITS,
        "hint": {"objective": [{"kind": "feature", "student": "relu2", "teacher": "relu2"}]},
    },
    "logits + AT": {
        "objective": LOGITS
        + [
            {
                "kind": "at",
                "student": ["relu1", "relu2"],
                "teacher": ["relu1", "relu2"],
                "weight": 1000.0,
            }
        ]
    },
    "logits + RKD": {
        "objective": LOGITS
        + [
            {"kind": "rkd_distance", "student": "embedding", "teacher": "embedding", "weight": 25},
            {"kind": "rkd_angle", "student": "embedding", "teacher": "embedding", "weight": 50},
        ]
    },
}


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4, help="student budget in epochs")
    ap.add_argument("--out", default="runs/intermediate")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    base = load_recipe("fashion-cnn").model_dump()
    base["train"]["epochs"] = args.epochs
    base["evaluation"]["measure_cache_speedup"] = False
    # the dump holds the seeds the recipe copied down; drop them so each run's seed applies
    base["train"].pop("seed")
    base["teacher"]["train"].pop("seed")
    teacher_dir: Path | None = None
    acc: dict[str, list[float]] = {"student without teacher": [], **{v: [] for v in VARIANTS}}
    agree: dict[str, list[float]] = {k: [] for k in acc}
    teacher_acc = None
    for seed in args.seeds:
        for name, variant in VARIANTS.items():
            recipe = json.loads(json.dumps(base))
            recipe.update(seed=seed, name=f"{name}-seed{seed}", baseline=name == "logits")
            recipe["objective"] = variant["objective"]
            if "hint" in variant:
                # one epoch of hints, the rest of the budget on the logits objective
                recipe["hint"] = {**variant["hint"], "train": {**base["train"], "epochs": 1}}
                recipe["train"]["epochs"] = args.epochs - 1
            if teacher_dir is not None:
                recipe["teacher"]["path"] = str(teacher_dir)
            run_dir = out / f"{name.replace(' ', '').replace('+', '_')}-seed{seed}"
            results = run_recipe(load_recipe_dict(recipe), run_dir, resume=True)
            if teacher_dir is None:
                teacher_dir = run_dir / "teacher" / "final"
            teacher_acc = results["teacher"]["accuracy"]
            runs = results["settings"][0]["runs"]
            acc[name].append(runs["distilled"]["accuracy"])
            agree[name].append(runs["distilled"]["agreement"])
            if "baseline" in runs:
                acc["student without teacher"].append(runs["baseline"]["accuracy"])
                agree["student without teacher"].append(runs["baseline"]["agreement"])
            print(f"seed {seed} {name}: {100 * runs['distilled']['accuracy']:.2f}%", flush=True)
    lines = [
        f"| student ({len(args.seeds)} seeds, {args.epochs} epochs) | test accuracy (%) "
        "| agreement with teacher (%) |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {_mean_sd(v)} | {_mean_sd(agree[k])} |" for k, v in acc.items()]
    lines.append(
        f"\nTeacher: {100 * teacher_acc:.2f}% (one teacher, seed 0). Seeds "
        f"{args.seeds}; mean ± sample standard deviation. Wall time "
        f"{time.perf_counter() - t0:.0f} s."
    )
    table = "\n".join(lines)
    print(table)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "accuracy": acc,
                "agreement": agree,
                "teacher_accuracy": teacher_acc,
                "seeds": args.seeds,
                "epochs": args.epochs,
            },
            indent=1,
        )
    )


def load_recipe_dict(data: dict):
    """Validate a recipe given as a dict (same checks as a YAML file)."""
    from potstill.recipe.classic import ClassicRecipe

    return ClassicRecipe.model_validate(data)


if __name__ == "__main__":
    main()
