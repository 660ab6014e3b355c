"""How the minilm-from-mpnet recipe's objectives were chosen: on a tuning split of fortunes texts
disjoint from the recipe's training and held-out texts (texts 1600-1999 of the seed-0 shuffle;
the recipe trains on 0-1199 and reports on 1200-1599).

Prints neighbour agreement@10 and similarity Spearman ρ against the teacher on the tuning split
for the derived 3-layer student before training and after 2 epochs with each objective.

    python benchmarks/embed_objective_sweep.py
"""

from __future__ import annotations

import copy
import random

from potstill.assets import resolve
from potstill.config import OptimizerConfig, ScheduleConfig, TrainConfig
from potstill.data.fortunes import load_fortunes
from potstill.distiller import Distiller
from potstill.hf import load_model, load_tokenizer
from potstill.losses.objective import Objective
from potstill.recipe.common import TermSpec
from potstill.students import derive
from potstill.tasks.embedding import (
    embed,
    encoder_forward,
    neighbour_agreement,
    similarity_correlation,
    tokenize_pair,
)
from potstill.teachers import PrecomputedTeacher

TEACHER, STUDENT = (
    "sentence-transformers/all-mpnet-base-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
)
T_TAPS = {
    "layers": "encoder.layer.*",
    "q": "encoder.layer.11.attention.attn.q",
    "k": "encoder.layer.11.attention.attn.k",
    "v": "encoder.layer.11.attention.attn.v",
}
S_TAPS = {
    "layers": "encoder.layer.*",
    "q": "encoder.layer.2.attention.self.query",
    "k": "encoder.layer.2.attention.self.key",
    "v": "encoder.layer.2.attention.self.value",
}
COUNTS = {
    "student": {"layers": 3, "q": 1, "k": 1, "v": 1},
    "teacher": {"layers": 12, "q": 1, "k": 1, "v": 1},
}
COS = {"kind": "feature", "student": "logits", "teacher": "logits", "loss": "cosine", "name": "c"}
MSE = {"kind": "feature", "student": "logits", "teacher": "logits", "loss": "mse", "name": "m"}
PKT = {"kind": "pkt", "name": "p"}
RKD = {"kind": "rkd_distance", "name": "r"}
HID = {
    "kind": "feature",
    "student": "layers",
    "teacher": "layers",
    "layer_map": "uniform",
    "loss": "mse",
    "name": "h",
}
REL = {
    "kind": "minilm",
    "student": ["q", "k", "v"],
    "teacher": ["q", "k", "v"],
    "relation_heads": 12,
    "name": "rel",
}
VARIANTS = {
    "cosine + MSE, lr 1e-4": ([COS, MSE], 1e-4),
    "cosine, lr 3e-5": ([COS], 3e-5),
    "PKT, lr 3e-5": ([PKT], 3e-5),
    "RKD distance, lr 3e-5": ([RKD], 3e-5),
    "cosine + PKT, lr 3e-5": ([COS, PKT], 3e-5),
    "PKT, lr 1e-4": ([PKT], 1e-4),
    "PKT + hidden, lr 3e-5": ([PKT, HID], 3e-5),
    "PKT + relations, lr 3e-5": ([PKT, REL], 3e-5),
    "PKT + hidden x0.05, lr 1e-4": ([PKT, {**HID, "weight": 0.05}], 1e-4),
    "PKT + relations x0.005, lr 1e-4": ([PKT, {**REL, "weight": 0.005}], 1e-4),
}


def main() -> None:
    teacher = load_model(resolve(TEACHER), attn_implementation="eager")
    base = load_model(resolve(STUDENT), attn_implementation="eager")
    t_tok, s_tok = load_tokenizer(resolve(TEACHER)), load_tokenizer(resolve(STUDENT))
    texts = load_fortunes()
    random.Random(0).shuffle(texts)
    train = tokenize_pair(texts[:1200], t_tok, s_tok, 48)
    tune = tokenize_pair(texts[1600:2000], t_tok, s_tok, 48)
    init = derive(base, keep=3)
    source = PrecomputedTeacher(teacher, train, encoder_forward("t_"), T_TAPS)
    t_tune = embed(teacher, tune, encoder_forward("t_"))

    def score(model) -> str:
        e = embed(model, tune, encoder_forward("s_"))
        return (
            f"neighbours@10 {neighbour_agreement(e, t_tune):.3f}  "
            f"similarity ρ {similarity_correlation(e, t_tune):.3f}"
        )

    print(f"{'derived, not distilled':<34} {score(init)}", flush=True)
    for name, (terms, lr) in VARIANTS.items():
        objective = Objective([TermSpec(**t).build(COUNTS) for t in terms])
        cfg = TrainConfig(
            epochs=2,
            batch_size=16,
            optimizer=OptimizerConfig(lr=lr),
            schedule=ScheduleConfig(name="cosine", warmup_ratio=0.1),
            progress=False,
            tensorboard=False,
        )
        student = copy.deepcopy(init).train()
        fit = Distiller(
            student,
            objective,
            train,
            teacher=source,
            config=cfg,
            student_forward=encoder_forward("s_"),
            student_taps=S_TAPS,
        ).fit()
        print(f"{name:<34} {score(fit.student)}", flush=True)


if __name__ == "__main__":
    main()
