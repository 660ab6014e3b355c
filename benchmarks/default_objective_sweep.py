"""How the default recipe's temperature and alpha were chosen: on the validation set, never test.

Uses the teacher (and its logit cache) of a finished default run, and trains the default student
for the default budget in both settings with each (T, alpha), plus the labels-only baseline.

    python benchmarks/default_objective_sweep.py [--run runs/default]
"""

from __future__ import annotations

import argparse
import copy

import torch

from potstill import Distiller
from potstill.cache import CachedTeacher
from potstill.data.splits import hide_labels, labelled_only, load_splits
from potstill.evaluate import classification_eval
from potstill.losses.terms import hinton_objective, labels_only_objective
from potstill.models import build_model
from potstill.recipe import load_recipe

GRID = [(1.0, 0.5), (2.0, 0.5), (2.0, 0.9), (4.0, 0.5), (4.0, 0.7), (4.0, 0.9), (8.0, 0.9)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default", help="a finished run of the default recipe")
    args = ap.parse_args()
    recipe = load_recipe("default")
    splits = load_splits("fashion-mnist", seed=recipe.seed)
    source = CachedTeacher(f"{args.run}/teacher/logits-train.safetensors", dataset=splits.train)
    evaluate = classification_eval(splits.val)
    arch = recipe.student.arch
    cfg = recipe.train.model_copy(update={"progress": False, "tensorboard": False})
    print("setting      objective          val accuracy")
    for setting in recipe.settings:
        train = hide_labels(splits.train, setting.labelled_fraction, recipe.seed)
        torch.manual_seed(recipe.seed)
        init = build_model(arch)
        runs = []
        for t, a in GRID:
            d = Distiller(
                copy.deepcopy(init), hinton_objective(t, a), train, teacher=source, config=cfg
            )
            runs.append((f"kd T={t:g} alpha={a:g}", d.fit()))
        steps = runs[0][1].steps
        base_cfg = cfg.model_copy(update={"max_steps": steps, "epochs": None})
        base = Distiller(
            copy.deepcopy(init), labels_only_objective(), labelled_only(train), config=base_cfg
        ).fit()
        for name, r in [("labels only", base)] + runs:
            print(f"{setting.name:<12} {name:<18} {100 * evaluate(r.student)['accuracy']:.2f}%")


if __name__ == "__main__":
    main()
