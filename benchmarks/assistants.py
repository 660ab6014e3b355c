"""Teacher assistant on Fashion-MNIST: a large MLP teacher distilled into a tiny MLP student
directly, and through one assistant planned between them (potstill.stages.plan_arch), over
several seeds; born-again: the student's own architecture taught by the previous generation.

Setting (the default recipe's few-labels setting): the students see labels for 5% of the 55,000
training images and the teacher's soft targets on all of them; Hinton loss T = 2, α = 0.9; each
student and the assistant train ``--epochs`` epochs with AdamW 3e-3 (cosine), batch 128, the
teacher's logits cached once. Test accuracy on the 10,000 test images; mean ± spread over seeds.

    .venv/bin/python benchmarks/assistants.py                       # trains the teacher (~2 min)
    .venv/bin/python benchmarks/assistants.py --teacher runs/default/teacher/final
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import potstill
from potstill.data.splits import hide_labels, load_splits
from potstill.evaluate import accuracy, predict_logits
from potstill.models import ArchSpec, build_model, count_parameters, load_model_folder
from potstill.stages import distill_chain, plan_arch


def _train_teacher(splits, seed: int):
    from potstill.config import OptimizerConfig, ScheduleConfig, TrainConfig
    from potstill.distiller import Distiller
    from potstill.losses.terms import labels_only_objective

    torch.manual_seed(seed)
    teacher = build_model(ArchSpec(hidden=[1024, 1024], dropout=0.2))
    cfg = TrainConfig(
        epochs=6, batch_size=128, seed=seed, progress=False,
        optimizer=OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.01),
        schedule=ScheduleConfig(name="cosine", warmup_steps=100),
    )  # fmt: skip
    return Distiller(teacher, labels_only_objective(), splits.train, config=cfg).fit().student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="a saved potstill model folder")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--student", type=int, nargs="+", default=[16], help="hidden widths")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    splits = load_splits("fashion-mnist", val_size=5000, seed=0)
    x, y = splits.test.tensors
    teacher = load_model_folder(args.teacher)[0] if args.teacher else _train_teacher(splits, 0)
    teacher.eval()
    t_acc = accuracy(predict_logits(teacher, splits.test)[0], y)
    big = ArchSpec(hidden=[1024, 1024])
    tiny = ArchSpec(hidden=args.student)
    (mid,) = plan_arch(big, tiny)
    sizes = {n: count_parameters(build_model(a)) for n, a in (("teacher", big), ("assistant", mid),
                                                              ("student", tiny))}  # fmt: skip
    print(
        f"teacher {big.hidden} {sizes['teacher']:,} params, test {t_acc:.4f}; assistant "
        f"{mid.hidden} {sizes['assistant']:,}; student {tiny.hidden} {sizes['student']:,}"
    )
    rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        train = hide_labels(splits.train, 0.05, seed)

        def one(t, s, stage, seed=seed, train=train):
            return potstill.distill(
                t, s, train, epochs=args.epochs, batch_size=128, lr=3e-3, temperature=2.0,
                alpha=0.9, seed=seed * 10 + stage, cache_teacher=True, progress=False,
            ).student  # fmt: skip

        def fresh(arch, seed=seed):
            torch.manual_seed(1000 + seed)
            return build_model(arch)

        # the direct student, and the same initial student trained on the labels alone
        result = potstill.distill(
            teacher, fresh(tiny), train, epochs=args.epochs, batch_size=128, lr=3e-3,
            temperature=2.0, alpha=0.9, seed=seed * 10, cache_teacher=True, baseline=True,
            progress=False,
        )  # fmt: skip
        direct, base = result.student, result.baseline
        assistant, via = distill_chain(teacher, [fresh(mid), fresh(tiny)], one)
        (born_again,) = distill_chain(direct, [fresh(tiny)], one)  # generation 2
        for name, model in (("student without teacher", base), ("direct", direct),
                            ("assistant", assistant), ("through the assistant", via),
                            ("born-again generation 2", born_again)):  # fmt: skip
            acc = accuracy(model.eval()(x), y)
            rows.setdefault(name, []).append(acc)
            print(f"  seed {seed} {name}: {acc:.4f}", flush=True)
    print(f"\nteacher: {t_acc:.4f} ({sizes['teacher']:,} parameters)")
    print("| model | parameters | test accuracy, mean | per seed |")
    print("|---|---|---|---|")
    for name, accs in rows.items():
        n = sizes["assistant"] if name == "assistant" else sizes["student"]
        per = ", ".join(f"{a:.4f}" for a in accs)
        print(f"| {name} | {n:,} | {statistics.mean(accs):.4f} | {per} |")
    d = [a - b for a, b in zip(rows["through the assistant"], rows["direct"], strict=True)]
    print(f"\nthrough the assistant − direct: {', '.join(f'{v:+.4f}' for v in d)} (per seed); "
          f"{time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads")  # fmt: skip


if __name__ == "__main__":
    main()
