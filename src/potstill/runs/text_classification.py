"""The text-classification runner: the user's table read and split, its labels checked against
the teacher, the teacher loaded (or fine-tuned first), each model's tokenization cached, the
student derived from the teacher's layers (or another model) and trained with distillation,
the same student without a teacher at the same budget, all of them measured on the test split;
``results.json``, the report, and each student exported as a plain Hugging Face classifier with
its tokenizer and model card."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..assets import resolve
from ..cache import cached_or_live
from ..config import TrainConfig, same_budget
from ..data.labels import (
    LABEL_COLUMNS,
    check_teacher_labels,
    classes_for,
    encode_labels,
    head_config,
)
from ..data.tables import carve, find_column, load_table_splits
from ..data.tokenized import TableDataset
from ..distiller import Distiller
from ..evaluate import classification_eval, predict_logits
from ..guards import check_texts
from ..hf import load_model, load_tokenizer
from ..losses.objective import Objective
from ..losses.terms import labels_only_objective
from ..recipe.text_classification import TextClassificationRecipe
from ..report import write_report
from ..report.card import CardMeta, hub_datasets, model_card, write_model_card
from ..students import derive
from ..taps import tap_counts
from ..tasks import get_task
from ..tasks.text_classifier import TEXT_COLUMNS, tokenized_splits
from ..teachers import LiveTeacher, TeacherSource
from .folder import RunFolder, fit_info, teacher_load_options

log = logging.getLogger("potstill")

TASK = get_task("text-classifier")
KIND = "sequence-classification"


@dataclass
class Prepared:
    """What a text-classification run reads: the splits as batches for both models, the class
    names, the tokenizers, the forwards and what was left out or cut on the way."""

    splits: dict[str, TableDataset]
    classes: list[str]
    teacher_tok: Any
    student_tok: Any
    teacher_forward: Any
    student_forward: Any
    columns: dict[str, str]
    left_out: dict[str, int]
    cut: dict[str, dict[str, int]] = field(default_factory=dict)


def run(
    recipe: TextClassificationRecipe,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run a text-classification recipe in ``run_dir``; returns the results (also in
    results.json). ``resume`` reuses finished parts and continues an interrupted one from its
    checkpoint; ``overwrite`` empties the folder first. One process (torchrun is refused)."""
    if distributed.world_size() > 1:
        raise ValueError("text-classification recipes run on one process; launch without torchrun")
    with RunFolder(run_dir, recipe, resume=resume, overwrite=overwrite) as folder:
        teacher_path = resolve(recipe.teacher.model)
        teacher_config = _config(teacher_path, recipe)
        data = prepare_data(recipe, teacher_config)
        folder.start()
        return _run(recipe, folder, data, teacher_path)


def _config(path: str, recipe: TextClassificationRecipe) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=recipe.teacher.trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(
            f"teacher.model: cannot read the config of {recipe.teacher.model!r}: {e}"
        ) from e


def prepare_data(recipe: TextClassificationRecipe, teacher_config: Any) -> Prepared:
    """The recipe's table split, labelled by class index, tokenized for teacher and student."""
    d = recipe.data
    options = d.source_options()
    sizes = {k: options.pop(k) for k in ("val_size", "test_size")}
    tables = load_table_splits(**options, seed=recipe.seed, where="data")
    train = tables["train"]
    text = find_column(train, "text", d.columns.get("text"), TEXT_COLUMNS, "data")
    label = find_column(train, "label", d.columns.get("label"), LABEL_COLUMNS, "data")
    pair = d.columns.get("text_pair")
    if pair is not None:
        find_column(train, "text_pair", pair, (), "data")
    check_texts(tables, [text, *([pair] if pair else [])], "data")  # rows as read, uncarved
    tables = carve(tables, **sizes, seed=recipe.seed, where="data")
    if "validation" not in tables or "test" not in tables:
        raise ValueError(
            "data: a text-classification run needs validation and test splits; give them as "
            "files or set data.val_size / data.test_size"
        )
    train = tables["train"]
    finetune = recipe.teacher.finetune is not None
    names = classes_for(train, label, given=d.labels, config=None if finetune else teacher_config)
    if not finetune:
        check_teacher_labels(names, teacher_config)
    tables, left_out = encode_labels(tables, label, names, drop_unknown=bool(d.labels))
    t_spec, s_spec = recipe.teacher, recipe.student
    t_tok = load_tokenizer(resolve(t_spec.model), trust_remote_code=t_spec.trust_remote_code)
    s_tok = None
    if s_spec.model is not None:
        s_tok = load_tokenizer(resolve(s_spec.model), trust_remote_code=s_spec.trust_remote_code)
    tok = tokenized_splits(tables, t_tok, s_tok, text, text_pair=pair, max_length=d.max_length)
    return Prepared(
        tok.splits, names, t_tok, s_tok or t_tok, tok.teacher_forward, tok.student_forward,
        {"text": text, "label": label, **({"text_pair": pair} if pair else {})}, left_out,
        tok.cut,
    )  # fmt: skip


def _load(
    path: str | Path, spec: Any, names: list[str], *, new_head: bool, seed: int, **extra: Any
) -> nn.Module:
    """A sequence classifier; with ``new_head`` its head is made for ``names`` (a base model,
    or a classifier of other classes whose head is replaced)."""
    if new_head:
        extra.update(head_config(names), ignore_mismatched_sizes=True)
    torch.manual_seed(seed)  # a new head's initial weights: the same in every run of the recipe
    return load_model(
        path, KIND, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
        attn_implementation="eager", **extra,
    )  # fmt: skip


def train_part(
    run: RunFolder,
    part: str,
    model: nn.Module,
    objective: Objective,
    data: Prepared,
    config: TrainConfig,
    teacher: TeacherSource | None,
    *,
    forward: Any,
    tokenizer: Any,
    taps: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one model in the run's subfolder ``part`` and export it (or reload its export when
    it finished before); returns the model and what its training measured."""
    folder = run.path / part
    info = run.finished(part)
    if info is not None:
        log.info("%s: finished earlier, reusing %s", part, folder / "final")
    else:
        model.train()
        result = Distiller(
            model, objective, data.splits["train"], teacher=teacher, config=config,
            run_dir=folder, best_metric="accuracy", name=part, student_forward=forward,
            evaluate=classification_eval(data.splits["validation"], batch_size=64,
                                         forward=forward),
            student_taps=taps, placement=run.placement,
        ).fit(resume=run.resume)  # fmt: skip
        info = fit_info(result, len(data.splits["train"]))
        TASK.export(result.student, folder / "final", tokenizer=tokenizer)
        run.mark_finished(part, info)
    # the model as exported, as a resumed run reloads it (see runs.classic)
    return run.place_student(load_model(folder / "final", KIND)), info


def _teacher(
    recipe: TextClassificationRecipe, run: RunFolder, data: Prepared, path: str
) -> tuple[nn.Module, dict[str, Any]]:
    spec = recipe.teacher
    if spec.finetune is None:
        model = _load(path, spec, data.classes, new_head=False, seed=recipe.seed,
                      **teacher_load_options(spec))  # fmt: skip
        return run.place_teacher(model), {"source": spec.model}
    base = _load(path, spec, data.classes, new_head=True, seed=recipe.seed)
    model, info = train_part(
        run, "teacher", base, labels_only_objective(), data, spec.finetune, None,
        forward=data.teacher_forward, tokenizer=data.teacher_tok,
    )  # fmt: skip
    return run.place_teacher(model), {"source": "fine-tuned in this run", **info}


def _student_init(recipe: TextClassificationRecipe, teacher: nn.Module, data: Prepared):
    s = recipe.student
    if s.model is None:
        return derive(teacher, keep=s.keep, layers=s.layers), "layers of the teacher"
    model = _load(resolve(s.model), s, data.classes, new_head=True, seed=recipe.seed + 1)
    if s.derived:
        model = derive(model, keep=s.keep, layers=s.layers)
    return model, f"layers of `{s.model}`"


def _run(
    recipe: TextClassificationRecipe, run: RunFolder, data: Prepared, teacher_path: str
) -> dict[str, Any]:
    teacher, teacher_info = _teacher(recipe, run, data, teacher_path)
    init, student_from = _student_init(recipe, teacher, data)
    s_taps, t_taps = recipe.taps.as_taps("student"), recipe.taps.as_taps("teacher")
    counts = {"student": tap_counts(init, s_taps), "teacher": tap_counts(teacher, t_taps)}
    objective = recipe.build_objective(counts)
    train = data.splits["train"]
    source: TeacherSource
    if objective.needs_teacher_features or not recipe.teacher.cache:
        source = LiveTeacher(teacher, forward=data.teacher_forward, taps=t_taps or None)
    else:
        source = cached_or_live(
            teacher, train, run.path / "teacher" / "cache-train", forward=data.teacher_forward
        )
    runs: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    runs["distilled"] = train_part(
        run, "distilled", copy.deepcopy(init), objective, data, recipe.train, source,
        forward=data.student_forward, tokenizer=data.student_tok, taps=s_taps or None,
    )  # fmt: skip
    if isinstance(source, LiveTeacher):
        source.close()
    if recipe.baseline:
        runs["baseline"] = train_part(
            run, "baseline", copy.deepcopy(init), labels_only_objective(), data,
            same_budget(recipe.train, runs["distilled"][1]["steps"]), None,
            forward=data.student_forward, tokenizer=data.student_tok,
        )  # fmt: skip
    rows = _measure(recipe, data, teacher, teacher_info, runs)
    results = run.write_results(
        {
            "task": "text-classification",
            "data": {
                "source": recipe.data.described,
                "columns": data.columns,
                "classes": data.classes,
                "rows": {k: len(v) for k, v in data.splits.items()},
                "left_out": data.left_out,
                "cut": data.cut,
                "max_length": recipe.data.max_length,
            },
            "teacher": recipe.teacher.model,
            "student": student_from,
            "derived_layers": getattr(init.config, "potstill_derived_from", None),
            "objective": [t.model_dump(exclude_unset=True) for t in recipe.objective],
            "rows": rows,
        }
    )
    _write_cards(recipe, run, data, runs, rows, student_from)
    write_report(run.path, results)
    return results


def _measure(
    recipe: TextClassificationRecipe,
    data: Prepared,
    teacher: nn.Module,
    teacher_info: dict[str, Any],
    runs: dict[str, tuple[nn.Module, dict[str, Any]]],
) -> dict[str, Any]:
    test = data.splits["test"]
    ev = recipe.evaluation
    figures = {
        "latency_batch": ev.latency_batch, "throughput_batch": ev.throughput_batch,
        "user_metrics": ev.user_metrics(),
    }  # fmt: skip
    teacher_logits, _ = predict_logits(teacher, test, batch_size=64, forward=data.teacher_forward)
    rows = TASK.metrics(
        {"teacher": teacher}, test, forwards={"teacher": data.teacher_forward},
        classes=data.classes, **figures,
    )  # fmt: skip
    rows["teacher"].update(teacher_info)
    measured = TASK.metrics(
        {k: m for k, (m, _) in runs.items()}, test,
        forwards={k: data.student_forward for k in runs}, classes=data.classes,
        teacher_logits=teacher_logits, **figures,
    )  # fmt: skip
    for kind, (_, info) in runs.items():
        rows[kind] = {**measured[kind], **info, "metrics": f"{kind}/metrics.jsonl"}
    return rows


def _write_cards(
    recipe: TextClassificationRecipe,
    run: RunFolder,
    data: Prepared,
    runs: dict[str, tuple[nn.Module, dict[str, Any]]],
    rows: dict[str, Any],
    student_from: str,
) -> None:
    t = rows["teacher"]
    for kind in runs:
        row = rows[kind]
        distilled = kind == "distilled"
        card = model_card(
            title=f"{recipe.name}: {kind}",
            teacher=f"`{recipe.teacher.model}` ({t['parameters']:,} parameters)"
            if distilled
            else "no teacher (the same-budget baseline)",
            student=f"{row['layers']} {student_from} ({row['parameters']:,} parameters)",
            data=f"{recipe.data.described} ({len(data.splits['train']):,} training texts, "
            f"{len(data.classes)} classes)",
            steps=row.get("steps"),
            objective=[t.model_dump(exclude_unset=True) for t in recipe.objective]
            if distilled
            else [{"kind": "ce", "weight": 1.0}],
            figures={k: v for k, v in row.items() if k not in ("metrics", "val_best")},
            summary=f"Test accuracy {100 * row['accuracy']:.2f}%, macro-F1 "
            f"{100 * row['macro_f1']:.2f}% (teacher {100 * t['accuracy']:.2f}% / "
            f"{100 * t['macro_f1']:.2f}%), top-1 agreement with the teacher "
            f"{100 * row['agreement']:.2f}%. Load it with "
            "`AutoModelForSequenceClassification.from_pretrained(folder)`.",
            command=run.rerun_command,
            meta=CardMeta(
                task="text-classification",
                base_models=[recipe.teacher.model, recipe.student.model],
                datasets=hub_datasets(recipe.data), data_name=recipe.data.described,
                metrics={"accuracy": row["accuracy"], "f1": row["macro_f1"]},
                recipe=recipe.model_dump(mode="json"),
            ),
        )  # fmt: skip
        write_model_card(run.path / kind / "final", card)
