"""An embedding-distillation run: a Hugging Face sentence-encoder teacher, a student derived by
keeping some layers of a smaller encoder, several objectives at the same budget, evaluation of
every model against the teacher, exported students, a report."""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, model_validator

from ._version import __version__
from .assets import resolve
from .config import TrainConfig
from .data.fortunes import load_fortunes
from .data.tensors import TensorDictDataset, make_batch
from .distiller import Distiller
from .evaluate import file_size, median_seconds
from .hf import check_aligned_positions, export_pretrained, load_model, load_tokenizer
from .io import atomic_write_text
from .losses.objective import Objective
from .models import count_parameters
from .recipe import TapsSpec, TermSpec, _Strict
from .report import describe_term
from .students import derive
from .taps import tap_counts
from .tasks.embedding import (
    embed,
    encoder_forward,
    linear_map_cosine,
    neighbour_agreement,
    similarity_correlation,
    tokenize_pair,
)
from .teachers import PrecomputedTeacher

log = logging.getLogger("potstill")


class HFModelSpec(_Strict):
    """A Hugging Face model by hub name or path; ``keep``/``layers`` derive a student from it."""

    model: str
    keep: int | None = Field(None, gt=0)
    layers: list[int] | None = None
    trust_remote_code: bool = False


class TextDataSpec(_Strict):
    """Texts for embedding distillation (Debian's fortunes)."""

    name: Literal["fortunes"] = "fortunes"
    folder: str | None = None
    max_length: int = Field(48, gt=2)
    train: int = Field(1500, gt=0)
    val: int = Field(500, gt=10)


class EmbedRecipe(_Strict):
    """A sentence-embedding distillation run (``kind: embed``)."""

    kind: Literal["embed"]
    name: str = "embed"
    seed: int = 0
    teacher: HFModelSpec
    student: HFModelSpec
    data: TextDataSpec = Field(default_factory=TextDataSpec)
    taps: TapsSpec = Field(default_factory=TapsSpec)
    variants: dict[str, list[TermSpec]]
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=2, batch_size=16))
    latency_batch: int = 1
    throughput_batch: int = 64

    @model_validator(mode="before")
    @classmethod
    def _keep_budget_default(cls, data: Any) -> Any:
        # a partial train section keeps the default budget (as in classic recipes)
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            data = {**data, "train": {"epochs": 2, **data["train"]}}
        return data

    @model_validator(mode="after")
    def _seed(self) -> EmbedRecipe:
        if "seed" not in self.train.model_fields_set:
            self.train.seed = self.seed
        return self


def _speed(
    model: torch.nn.Module, ds: TensorDictDataset, prefix: str, batch_size: int, repeats: int = 10
) -> float:
    forward = encoder_forward(prefix)
    batch = make_batch(ds, torch.arange(min(batch_size, len(ds))))
    with torch.no_grad():
        return median_seconds(lambda: forward(model, batch), repeats, warmup=2)


def run_embed_recipe(recipe: EmbedRecipe, run_dir: str | Path) -> dict[str, Any]:
    """Run an embedding recipe in ``run_dir``; returns the results (also in results.json)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        run_dir / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    )
    t_start = time.perf_counter()
    t_path, s_path = resolve(recipe.teacher.model), resolve(recipe.student.model)
    teacher = load_model(
        t_path, trust_remote_code=recipe.teacher.trust_remote_code, attn_implementation="eager"
    )
    base = load_model(
        s_path, trust_remote_code=recipe.student.trust_remote_code, attn_implementation="eager"
    )
    t_tok = load_tokenizer(t_path, trust_remote_code=recipe.teacher.trust_remote_code)
    s_tok = load_tokenizer(s_path, trust_remote_code=recipe.student.trust_remote_code)

    texts = load_fortunes(recipe.data.folder)
    random.Random(recipe.seed).shuffle(texts)
    n_train, n_val = recipe.data.train, recipe.data.val
    if n_train + n_val > len(texts):
        raise ValueError(f"data: train + val = {n_train + n_val} but only {len(texts)} texts")
    check_aligned_positions(t_tok, s_tok, texts[:50])
    train = tokenize_pair(texts[:n_train], t_tok, s_tok, recipe.data.max_length)
    val = tokenize_pair(texts[n_train : n_train + n_val], t_tok, s_tok, recipe.data.max_length)

    torch.manual_seed(recipe.seed)
    spec = recipe.student
    init = derive(base, keep=spec.keep, layers=spec.layers) if spec.keep or spec.layers else base
    s_fwd, t_fwd = encoder_forward("s_"), encoder_forward("t_")
    student_taps, teacher_taps = recipe.taps.as_taps("student"), recipe.taps.as_taps("teacher")
    counts = {
        "student": tap_counts(init, student_taps),
        "teacher": tap_counts(teacher, teacher_taps),
    }
    t0 = time.perf_counter()
    source = PrecomputedTeacher(teacher, train, t_fwd, teacher_taps)
    teacher_pass_s = time.perf_counter() - t0
    t_val = embed(teacher, val, t_fwd)
    t_train = source.logits

    def figures(model: torch.nn.Module, prefix: str, fwd, known=None) -> dict[str, Any]:
        e_val, e_train = known or (embed(model, val, fwd), embed(model, train, fwd))
        return {
            "neighbour_agreement@10": neighbour_agreement(e_val, t_val, 10),
            "similarity_spearman": similarity_correlation(e_val, t_val),
            "linear_map_cosine": linear_map_cosine(e_train, t_train, e_val, t_val),
            "parameters": count_parameters(model),
            "layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "file_bytes": file_size(model),
            "latency_ms": 1e3 * _speed(model, val, prefix, recipe.latency_batch),
            "throughput": recipe.throughput_batch
            / _speed(model, val, prefix, recipe.throughput_batch, 3),
        }

    rows: dict[str, dict[str, Any]] = {
        "teacher": figures(teacher, "t_", t_fwd, (t_val, t_train)),
        "original student model": figures(base, "s_", s_fwd),
        "derived, not distilled": figures(init, "s_", s_fwd),
    }
    for name, terms in recipe.variants.items():
        objective = Objective([t.build(counts) for t in terms])
        folder = run_dir / "-".join(re.findall(r"[A-Za-z0-9]+", name)).lower()
        student = copy.deepcopy(init)
        student.train()
        fit = Distiller(
            student,
            objective,
            train,
            teacher=source,
            config=recipe.train,
            run_dir=folder,
            student_forward=s_fwd,
            student_taps=student_taps,
            name=name,
        ).fit()
        row = figures(fit.student, "s_", s_fwd)
        row.update(
            steps=fit.steps,
            train_time_s=fit.train_time_s,
            objective=[t.model_dump(exclude_unset=True) for t in terms],
            metrics=str(folder.relative_to(run_dir) / "metrics.jsonl"),
        )
        card = (
            f"# {recipe.name}: {name}\n\nDistilled by potstill {__version__} from "
            f"`{recipe.teacher.model}` into {init.config.num_hidden_layers} layers of "
            f"`{recipe.student.model}` on {n_train} fortunes texts.\n\n"
            + f"Objective: {', '.join(describe_term(o) for o in row['objective'])}.\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in row.items() if k != "objective")
            + "\n"
        )
        export_pretrained(
            fit.student,
            folder / "export",
            tokenizer=s_tok,
            card=card,
            sentence_transformers_from=s_path if Path(s_path).exists() else None,
        )
        rows[name] = row
    results = {
        "kind": "embed", "name": recipe.name, "seed": recipe.seed,
        "potstill_version": __version__, "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "teacher": recipe.teacher.model,
        "student": recipe.student.model, "derived_layers": getattr(
            init.config, "potstill_derived_from", None),
        "data": {"train": n_train, "val": n_val, "max_length": recipe.data.max_length},
        "teacher_pass_s": teacher_pass_s, "rows": rows,
        "wall_time_s": time.perf_counter() - t_start,
    }  # fmt: skip
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1, default=str))
    atomic_write_text(run_dir / "report.md", embed_markdown(results))
    return results


def embed_markdown(results: dict[str, Any]) -> str:
    """The embedding run's report as Markdown."""
    cols = (
        "model",
        "layers × hidden",
        "parameters",
        "neighbours@10",
        "similarity ρ",
        "cosine (linear map)",
        "latency b=1 (ms)",
        "throughput (texts/s)",
    )
    lines = [
        f"# potstill report: {results['name']}",
        "",
        f"Teacher `{results['teacher']}`; students from `{results['student']}` "
        f"(layers kept: {results['derived_layers']}). Held-out: {results['data']['val']} "
        f"fortunes texts; training: {results['data']['train']} texts, "
        f"{results['data']['max_length']} tokens at most. Seed {results['seed']}.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for name, r in results["rows"].items():
        lines.append(
            f"| {name} | {r['layers']} × {r['hidden_size']} | {r['parameters'] / 1e6:.1f}M | "
            f"{r['neighbour_agreement@10']:.3f} | {r['similarity_spearman']:.3f} | "
            f"{r['linear_map_cosine']:.3f} | {r['latency_ms']:.1f} | {r['throughput']:.0f} |"
        )
    lines += [
        "",
        "neighbours@10: mean overlap of each held-out text's 10 nearest neighbours under "
        "student and teacher; similarity ρ: Spearman correlation of all pairwise cosine "
        "similarities; cosine (linear map): mean cosine to the teacher's embedding after the "
        "least-squares linear map fitted on the training texts (same for every model). "
        f"Teacher pass (once, reused by every objective): {results['teacher_pass_s']:.0f} s."
        f" Whole run {results['wall_time_s']:.0f} s, {results['threads']} threads.",
        "",
    ]
    return "\n".join(lines)
