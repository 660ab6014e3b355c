"""The embedding runner: a Hugging Face sentence-encoder teacher, a student derived by keeping
some layers of a smaller encoder, several objectives at the same budget, every model evaluated
against the teacher, exported students with their model cards, a report."""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..assets import resolve
from ..data.rows import DataError
from ..data.sources import load_rows
from ..data.tables import find_column, load_table_splits
from ..distiller import Distiller
from ..hf import check_aligned_positions, load_model, load_tokenizer
from ..recipe.common import TermSpec, build_objective, folder_name
from ..recipe.embed import EmbedRecipe
from ..report import write_report
from ..report.card import CardMeta, hub_datasets, model_card, write_model_card
from ..students import derive
from ..taps import tap_counts
from ..tasks import get_task
from ..tasks.embedding import Pooling, embed, encoder_forward, tokenize_pair, tokenize_texts
from ..teachers import PrecomputedTeacher
from .folder import RunFolder, teacher_load_options, trained_on

log = logging.getLogger("potstill")

TASK = get_task("embedding")


def run(
    recipe: EmbedRecipe, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run an embedding recipe in ``run_dir``; returns the results (also in results.json).

    An existing run folder is continued only with ``resume`` (finished variants are reloaded
    from their exports, an interrupted one continues from its last checkpoint) or emptied first
    with ``overwrite``. Embedding runs use one process: under torchrun they are refused.
    """
    if distributed.world_size() > 1:
        raise ValueError("embed recipes run on one process; launch without torchrun")
    with RunFolder(run_dir, recipe, resume=resume, overwrite=overwrite) as folder:
        return _run(recipe, folder)


def _run(recipe: EmbedRecipe, run: RunFolder) -> dict[str, Any]:
    t_spec, s_spec = recipe.teacher, recipe.student
    t_path, s_path = resolve(t_spec.model), resolve(s_spec.model)
    teacher = load_model(
        t_path, dtype=t_spec.dtype, trust_remote_code=t_spec.trust_remote_code,
        attn_implementation="eager", **teacher_load_options(t_spec),
    )  # fmt: skip
    run.place_teacher(teacher)
    base = load_model(
        s_path, dtype=s_spec.dtype, trust_remote_code=s_spec.trust_remote_code,
        attn_implementation="eager",
    )  # fmt: skip
    t_tok = load_tokenizer(t_path, trust_remote_code=t_spec.trust_remote_code)
    s_tok = load_tokenizer(s_path, trust_remote_code=s_spec.trust_remote_code)

    train_texts, val_texts, column = _texts(recipe)
    n_train, n_val = len(train_texts), len(val_texts)
    check_aligned_positions(t_tok, s_tok, train_texts[:50][column])
    train = tokenize_texts(train_texts, column, t_tok, s_tok, recipe.data.max_length)
    val = tokenize_texts(val_texts, column, t_tok, s_tok, recipe.data.max_length)
    pooling = {"teacher": t_spec.pooling.resolve(t_path), "student": s_spec.pooling.resolve(s_path)}
    forwards = (
        encoder_forward("t_", pooling["teacher"]),
        encoder_forward("s_", pooling["student"]),
    )
    run.start()

    torch.manual_seed(recipe.seed)
    init = derive(base, keep=s_spec.keep, layers=s_spec.layers) if s_spec.derived else base
    run.place_student(init), run.place_student(base)
    student_taps, teacher_taps = recipe.taps.as_taps("student"), recipe.taps.as_taps("teacher")
    counts = {
        "student": tap_counts(init, student_taps),
        "teacher": tap_counts(teacher, teacher_taps),
    }
    t0 = time.perf_counter()
    source = PrecomputedTeacher(teacher, train, forwards[0], teacher_taps)
    teacher_pass_s = time.perf_counter() - t0
    known = (embed(teacher, val, forwards[0]), source.logits)
    figures = {
        "teacher": teacher, "train": train, "teacher_embeddings": known,
        "latency_batch": recipe.latency_batch, "throughput_batch": recipe.throughput_batch,
        "forwards": forwards,
        "pairs": _pairs(recipe, t_tok, s_tok),
    }  # fmt: skip
    rows = TASK.metrics(
        {"teacher": teacher, "original student model": base, "derived, not distilled": init},
        val, **figures,
    )  # fmt: skip
    shared = Shared(recipe, run, init, source, counts, student_taps, figures, train, val, s_tok,
                    s_path, pooling["student"])  # fmt: skip
    for name, terms in recipe.variants.items():
        rows[name] = _variant(shared, name, terms)
    results = run.write_results(
        {
            "teacher": t_spec.model,
            "student": s_spec.model,
            "derived_layers": getattr(init.config, "potstill_derived_from", None),
            "data": {
                "train": n_train,
                "val": n_val,
                "max_length": recipe.data.max_length,
                "source": "fortunes" if recipe.data.source is None else "source",
            },
            "pooling": {side: vars(p) for side, p in pooling.items()},
            "teacher_pass_s": teacher_pass_s,
            "rows": rows,
        }
    )
    write_report(run.path, results)
    return results


def _pairs(recipe: EmbedRecipe, t_tok: Any, s_tok: Any) -> tuple | None:
    """The recipe's scored sentence pairs, both sides tokenized for both models, or None."""
    p = recipe.pairs
    if p is None:
        return None
    tables = load_table_splits(**p.source_options(), seed=recipe.seed, where="pairs")
    table = tables.get("test", tables["train"])
    cols = [
        find_column(table, field, p.columns.get(field), candidates, "pairs")
        for field, candidates in (("text", ("sentence1", "text", "s1")),
                                  ("text_pair", ("sentence2", "text_pair", "s2")),
                                  ("score", ("score", "label", "similarity")))
    ]  # fmt: skip
    n = recipe.data.max_length
    first = tokenize_pair([str(t) for t in table[cols[0]]], t_tok, s_tok, n)
    second = tokenize_pair([str(t) for t in table[cols[1]]], t_tok, s_tok, n)
    return first, second, [float(x) for x in table[cols[2]]]


def _texts(recipe: EmbedRecipe) -> tuple[Any, Any, str]:
    """The training and held-out texts as tables, and their text column: fortunes (shuffled
    with the seed), or the recipe's own table (its train and validation splits, memory-mapped;
    empty texts left out and counted) — ``data.train`` / ``data.val`` of them."""
    from datasets import Dataset as HFDataset

    d = recipe.data
    if d.source is None:
        texts = list(load_rows(d.name, folder=d.folder)["all"].column("text"))
        random.Random(recipe.seed).shuffle(texts)
        if d.train + d.val > len(texts):
            raise ValueError(f"data: train + val = {d.train + d.val} but only {len(texts)} texts")
        train, val = texts[: d.train], texts[d.train : d.train + d.val]
        return HFDataset.from_dict({"text": train}), HFDataset.from_dict({"text": val}), "text"
    tables = load_table_splits(**d.source.source_options(), seed=recipe.seed, where="data.source")
    if "validation" not in tables:
        raise DataError("data.source: give a validation split or set data.source.val_size")
    column = find_column(tables["train"], "text", d.source.columns.get("text"),
                         ("text", "sentence", "content"), "data.source")  # fmt: skip
    out = []
    for split, cap in (("train", "train"), ("validation", "val")):
        table = tables[split].shuffle(seed=recipe.seed)
        n = min(len(table), getattr(d, cap)) if cap in d.model_fields_set else len(table)
        table = table.select(range(n)).filter(
            lambda rows: [isinstance(t, str) and bool(t.strip()) for t in rows[column]],
            batched=True, desc=f"empty texts of {split}",
        )  # fmt: skip
        if len(table) < n:
            log.info("data.source %s: %d empty texts left out", split, n - len(table))
        out.append(table)
    return out[0], out[1], column


@dataclass
class Shared:
    """What every variant of an embedding run shares."""

    recipe: EmbedRecipe
    run: RunFolder
    init: torch.nn.Module
    source: PrecomputedTeacher
    counts: dict[str, dict[str, int]]
    student_taps: dict[str, Any]
    figures: dict[str, Any]
    train: Dataset
    val: Dataset
    tokenizer: Any
    student_path: str
    student_pooling: Pooling


def _variant(shared: Shared, name: str, terms: list[TermSpec]) -> dict[str, Any]:
    """One variant's student: trained from the derived student (or reloaded from its export
    when it finished before), exported with its card; returns its row."""
    recipe, run, init = shared.recipe, shared.run, shared.init
    part = folder_name(name)
    trained = run.finished(part)
    if trained is not None:
        log.info("%s: finished before, reloading %s", name, run.path / part / "export")
        student = run.place_student(load_model(run.path / part / "export", dtype=init.dtype))
    else:
        student = copy.deepcopy(init)
        student.train()
        fit = Distiller(
            student, build_objective(terms, shared.counts), shared.train, teacher=shared.source,
            config=recipe.train, run_dir=run.path / part,
            student_forward=shared.figures["forwards"][1],
            student_taps=shared.student_taps, name=name, placement=run.placement,
        ).fit(resume=run.resume)  # fmt: skip
        student = fit.student
        trained = {
            "steps": fit.steps,
            "train_time_s": fit.train_time_s,
            "objective": [t.model_dump(exclude_unset=True) for t in terms],
            "metrics": str(Path(part) / "metrics.jsonl"),
            **trained_on(fit),
        }
        st_from = shared.student_path if Path(shared.student_path).exists() else None
        TASK.export(
            student, run.path / part / "export", tokenizer=shared.tokenizer,
            sentence_transformers_from=st_from,
            pooling=shared.student_pooling,
        )  # fmt: skip
        run.mark_finished(part, trained)
        # the student as exported, as a resumed run reloads it (see runs.classic)
        student = run.place_student(load_model(run.path / part / "export", dtype=init.dtype))
    row = {**TASK.metrics({name: student}, shared.val, **shared.figures)[name], **trained}
    card = model_card(
        title=f"{recipe.name}: {name}",
        teacher=f"`{recipe.teacher.model}`",
        student=f"{init.config.num_hidden_layers} layers of `{recipe.student.model}`",
        data=f"{len(shared.train)} "
        + ("fortunes texts" if recipe.data.source is None else "texts of your data"),
        steps=row["steps"],
        objective=row["objective"],
        figures={k: v for k, v in row.items() if k not in ("objective", "metrics")},
        command=run.rerun_command,
        meta=CardMeta(
            task="sentence-similarity", library="sentence-transformers"
            if (run.path / part / "export" / "modules.json").exists() else "transformers",
            base_models=[recipe.teacher.model, recipe.student.model],
            datasets=hub_datasets(recipe.data.source, recipe.pairs),
            data_name="held-out texts, against the teacher's embeddings",
            metrics={k: row[k] for k in ("neighbour_agreement@10", "similarity_spearman",
                                         "pairs_spearman") if k in row},
            recipe=recipe.model_dump(mode="json"),
        ),
    )  # fmt: skip
    write_model_card(run.path / part / "export", card)
    return row
