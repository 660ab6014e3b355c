"""The causal-LM runner: a Hugging Face teacher, a student derived from it by keeping some of its
layers (or another model sharing its tokenizer), several token-level objectives at the same
budget (on-policy optional, from a teacher cache optional), every model evaluated against the
teacher, exported students with their model cards, and a report with side-by-side generations."""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..distiller import Distiller
from ..hf import load_model, shared_vocab_size
from ..llm.data import pack_examples, pad_id, prompt_ids, trained_tokens
from ..llm.forward import causal_lm_hidden_forward, fused_head_problem
from ..llm.onpolicy import OnPolicySampler, SamplingSpec
from ..recipe.causal_lm import LMRecipe
from ..recipe.common import build_objective, folder_name
from ..report import write_report
from ..report.card import CardMeta, hub_datasets, model_card, write_model_card
from ..tasks import get_task
from ..tasks.causal_lm import answer_metrics
from ..teachers import LiveTeacher, TeacherSource
from .folder import RunFolder, trained_on
from .lm_data import (
    cached_source,
    initial_student,
    lm_datasets,
    load_lm_teacher,
    served_teacher,
)

log = logging.getLogger("potstill")

TASK = get_task("causal-lm")


def run(
    recipe: LMRecipe, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run a causal-LM recipe in ``run_dir``; returns the results (also in results.json), and
    writes report.md / report.html and each distilled student's export folder.

    An existing run folder is continued only with ``resume`` (finished variants are reloaded
    from their exports, an interrupted one continues from its last checkpoint) or emptied first
    with ``overwrite``.
    """
    if recipe.fused_head and distributed.world_size() > 1:
        raise ValueError(
            "fused_head: true runs the student's base model without its head, which DDP "
            "(torchrun) cannot synchronise; set fused_head: false for a distributed run"
        )
    with RunFolder(run_dir, recipe, resume=resume, overwrite=overwrite) as folder:
        folder.start()
        return _run(recipe, folder)


def _run(recipe: LMRecipe, run: RunFolder) -> dict[str, Any]:
    teacher, tok = load_lm_teacher(recipe)
    init, base, s_name = initial_student(recipe, teacher, tok)
    run.place_teacher(teacher), run.place_student(init)
    if recipe.fused_head and (problem := fused_head_problem(init)) is not None:
        raise ValueError(f"fused_head: {problem}; set fused_head: false")
    vocab = shared_vocab_size(teacher, init, len(tok))  # raises when the vocabularies differ

    d = recipe.data
    train, val, heldout = lm_datasets(recipe, tok, teacher=teacher, run_dir=run.path)
    response_tokens = trained_tokens(train)  # conversations: every assistant turn, no more
    n_examples = len(train)
    if d.packing:
        train = pack_examples(train, d.max_length)
        log.info("packed %d training examples into %d rows", n_examples, len(train))
    source: TeacherSource = LiveTeacher(teacher, forward=TASK.teacher_forward)
    cache_info: dict[str, Any] | None = None
    served = served_teacher(recipe)
    untrained = "derived, not distilled" if init is not base else "student, not distilled"
    try:
        if recipe.teacher.cache is not None:  # filled by the server when there is one
            source, train, cache_info = cached_source(recipe, run.path, teacher, tok, train,
                                                      served=served)  # fmt: skip
        elif served is not None:
            source = served
        students, trained = _train_variants(recipe, run, init, train, source, tok)
    finally:
        if served is not None:
            served.close()
    students = {untrained: init, **students}
    if not distributed.is_main():  # rank 0 evaluates and reports
        distributed.barrier()
        return {"kind": "causal-lm", "name": recipe.name, "rows": {}}

    models = {"teacher": teacher, **students}
    t0 = time.perf_counter()
    prompts = [prompt_ids(tok, p, d.format, d.system) for p in recipe.generate.prompts]
    rows = TASK.metrics(
        models, val, teacher=teacher, tokenizer=tok, prompts=prompts,
        max_new_tokens=recipe.generate.max_new_tokens, batch_size=recipe.eval_batch_size,
    )  # fmt: skip
    eval_s = time.perf_counter() - t0
    generations = {name: row.pop("generations") for name, row in rows.items()}
    for name, row in rows.items():
        row.update(trained.get(name, {}))
    answers_s = time.perf_counter()
    answers = None
    if heldout is not None:
        answers = answer_metrics(models, teacher, tok, heldout, batch_size=recipe.eval_batch_size)
        for name, row in answers["rows"].items():
            rows[name].update(row)
    answers_s = time.perf_counter() - answers_s
    _write_cards(recipe, run, rows, trained, init, response_tokens)
    results = run.write_results(
        {
            "teacher": recipe.teacher.model, "student": s_name,
            "derived_layers": getattr(init.config, "potstill_derived_from", None),
            "vocabulary": vocab,
            "data": {
                "name": d.name if d.source is None else "source",
                **({"source": d.source.model_dump(exclude_defaults=True), "style": d.style,
                    "described": d.source.described}
                   if d.source is not None else {}),
                "train": n_examples, "rows": len(train), "packing": d.packing,
                "val": len(val), "max_length": d.max_length, "format": d.format,
                "response_tokens": response_tokens, "val_tokens": int(rows["teacher"]["tokens"]),
            },
            "train": {
                "steps": recipe.train.max_steps, "batch_size": recipe.train.batch_size,
                "lr": recipe.train.optimizer.lr, "chunk_size": recipe.chunk_size,
            },
            "teacher_cache": cache_info,
            "teacher_server": None if served is None else served.figures(),
            "prompts": recipe.generate.prompts, "generations": generations,
            "answers": answers, "answers_eval_s": answers_s, "eval_s": eval_s, "rows": rows,
        }
    )  # fmt: skip
    write_report(run.path, results)
    distributed.barrier()
    return results


def _train_variants(
    recipe: LMRecipe,
    run: RunFolder,
    init: torch.nn.Module,
    train: Any,
    source: TeacherSource,
    tok: Any,
) -> tuple[dict[str, torch.nn.Module], dict[str, dict[str, Any]]]:
    """Every variant's student trained from ``init`` (or reloaded from its export when it
    finished before), and what its training recorded."""
    students: dict[str, torch.nn.Module] = {}
    trained: dict[str, dict[str, Any]] = {}
    forward = causal_lm_hidden_forward if recipe.fused_head else TASK.student_forward
    for name, variant in recipe.variants.items():
        part = folder_name(name)
        info = run.finished(part)
        export = run.path / part / "export"
        if info is not None:
            log.info("%s: finished before, reloading %s", name, export)
            trained[name] = info
            students[name] = run.place_student(load_model(export, "causal-lm", dtype=init.dtype))
            continue
        objective = build_objective(variant.terms, tokens=True, chunk_size=recipe.chunk_size)
        student = copy.deepcopy(init)
        student.train()
        sampler = None
        if variant.on_policy > 0:
            sampler = OnPolicySampler(
                student, lam=variant.on_policy, pad_token_id=pad_id(tok),
                eos_token_id=tok.eos_token_id, seed=recipe.seed,
                sampling=SamplingSpec(**variant.sampling.model_dump()),
            )  # fmt: skip
        fit = Distiller(
            student, objective, train, teacher=source if objective.needs_teacher else None,
            config=recipe.train, run_dir=run.path / part, student_forward=forward, name=name,
            batch_transform=sampler, placement=run.placement,
        ).fit(resume=run.resume)  # fmt: skip
        trained[name] = {
            "steps": fit.steps,
            "train_time_s": fit.train_time_s,
            "objective": [t.model_dump(exclude_unset=True) for t in variant.terms],
            "on_policy": variant.on_policy,
            "metrics": str(Path(part) / "metrics.jsonl"),
            "export": str(Path(part) / "export"),
            **trained_on(fit),
        }
        if distributed.is_main():  # every process holds the same student; rank 0 saves it
            TASK.export(fit.student, run.path / part / "export", tokenizer=tok)
            run.mark_finished(part, trained[name])
            if not recipe.keep_checkpoints:
                shutil.rmtree(run.path / part / "checkpoints", ignore_errors=True)
        distributed.barrier()
        # the student as exported, as a resumed run reloads it (see runs.classic)
        students[name] = run.place_student(load_model(export, "causal-lm", dtype=init.dtype))
    return students, trained


def _write_cards(
    recipe: LMRecipe,
    run: RunFolder,
    rows: dict[str, dict[str, Any]],
    trained: dict[str, dict[str, Any]],
    init: torch.nn.Module,
    response_tokens: int,
) -> None:
    """The model card of each distilled student, in its export folder."""
    d = recipe.data
    data_name = "fortunes" if d.name == "fortunes" else "prompts answered by the teacher"
    for name, info in trained.items():
        row = rows[name]
        card = model_card(
            title=f"{recipe.name}: {name}",
            teacher=f"`{recipe.teacher.model}`",
            student=f"{init.config.num_hidden_layers} of its layers",
            data=f"{d.train} {data_name} ({response_tokens} response tokens)",
            steps=info["steps"],
            objective=info["objective"],
            figures={k: v for k, v in row.items() if k not in ("objective", "metrics", "export")},
            summary=f"Held-out perplexity {row['perplexity']:.2f} (teacher "
            f"{rows['teacher']['perplexity']:.2f}).",
            command=run.rerun_command,
            meta=CardMeta(
                task="text-generation", base_models=[recipe.teacher.model, recipe.student.model],
                datasets=hub_datasets(d.source), data_name=f"held-out {data_name}",
                metrics={"perplexity": row["perplexity"]},
                recipe=recipe.model_dump(mode="json"),
            ),
        )  # fmt: skip
        write_model_card(run.path / info["export"], card)
