"""Evaluate any model folder potstill exports, on the user's data, by what the folder holds:
an image classifier (potstill's own or a Hugging Face one) on a built-in dataset's test split;
a Hugging Face sequence classifier on a table of texts and labels; a causal LM on a corpus or
conversations (perplexity); a sentence encoder against its teacher (neighbour agreement,
similarity correlation). With a teacher folder, the figures that compare with it too. What
``potstill eval`` prints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .data.rows import DataError

KINDS = ("image-classifier", "text-classifier", "causal-lm", "encoder")


def export_kind(folder: str | os.PathLike) -> str:
    """What a model folder holds (one of :data:`KINDS`), from its files: potstill's classifier
    spec or a Hugging Face image classifier, a sequence classifier, a causal LM, an encoder."""
    from .models import SPEC_FILE

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (give a model folder potstill wrote)")
    if (folder / SPEC_FILE).exists():
        return "image-classifier"
    config = folder / "config.json"
    if not config.exists():
        raise DataError(f"{folder}: neither potstill's model files nor a config.json")
    names = json.loads(config.read_text()).get("architectures") or []
    for name in names:
        if name.endswith("ForImageClassification"):
            return "image-classifier"
        if name.endswith("ForSequenceClassification"):
            return "text-classifier"
        if name.endswith("ForCausalLM"):
            return "causal-lm"
    return "encoder"


def _table(data: str | None, split: str | None, who: str) -> Any:
    """The rows of ``data`` (a file, folder or glob; ``hub:NAME`` a hub dataset) to evaluate
    on: its ``split``, else its test split, else its only one."""
    from .data.tables import load_table_splits

    if not data:
        raise DataError(f"give --data: the {who} is evaluated on a table of your data")
    source = {"hub": data[4:]} if data.startswith("hub:") else {"path": data}
    tables = load_table_splits(**source, where="--data")
    pick = split or ("test" if "test" in tables else "validation" if "validation" in tables
                     else "train")  # fmt: skip
    if pick not in tables:
        raise DataError(f"--split {pick}: the data has the splits {', '.join(tables)}")
    return tables[pick]


def evaluate_export(
    folder: str | os.PathLike,
    *,
    data: str | None = None,
    teacher: str | os.PathLike | None = None,
    split: str | None = None,
    columns: dict[str, str] | None = None,
    max_length: int = 128,
    batch_size: int = 16,
    data_dir: str | None = None,
    seed: int = 0,
    val_size: int = 5000,
) -> dict[str, Any]:
    """The figures of the model in ``folder`` (and, given its ``teacher`` folder, those that
    compare the two) on ``data``: for an image classifier a built-in dataset's name (its test
    split; ``data_dir``, ``seed`` and ``val_size`` as the run had them), for the others a
    table (file, folder, glob or ``hub:NAME``; ``split``, ``columns`` as in recipes)."""
    kind = export_kind(folder)
    out: dict[str, Any] = {"model": str(folder), "kind": kind}
    if kind == "image-classifier":
        from .data.splits import load_splits
        from .evaluate import model_card_figures, predict_logits
        from .vision import load_classifier

        splits = load_splits(data or "fashion-mnist", data_dir=data_dir, val_size=val_size,
                             seed=seed)  # fmt: skip
        t_logits = predict_logits(load_classifier(teacher), splits.test)[0] if teacher else None
        out.update(model_card_figures(load_classifier(folder), splits.test,
                                      teacher_logits=t_logits))  # fmt: skip
        return out
    from .hf import load_model

    table = _table(data, split, kind.replace("-", " "))
    if kind == "text-classifier":
        from .evaluate import predict_logits
        from .tasks.text_classifier import api_splits, metrics

        model = load_model(folder, "sequence-classification")
        t_model = load_model(teacher, "sequence-classification") if teacher else model
        tok, classes = api_splits(t_model, model, {"train": table}, columns=columns,
                                  max_length=max_length)  # fmt: skip
        rows = tok.splits["train"]
        t_logits = predict_logits(t_model, rows, forward=tok.teacher_forward)[0] if teacher \
            else None  # fmt: skip
        out.update(metrics({"model": model}, rows, forwards={"model": tok.student_forward},
                           classes=classes, teacher_logits=t_logits)["model"])  # fmt: skip
        out["examples"] = len(rows)
        return out
    if kind == "causal-lm":
        from .llm.evaluate import lm_figures
        from .tasks.causal_lm import api_datasets

        model = load_model(folder, "causal-lm")
        t_model = load_model(teacher, "causal-lm") if teacher else None
        rows = api_datasets(t_model or model, {"eval": table}, columns=columns,
                            max_length=max_length)["eval"]  # fmt: skip
        out.update(lm_figures({"model": model}, rows, teacher=t_model, batch_size=batch_size,
                              progress=False)["model"])  # fmt: skip
        return out
    return out | _encoder(folder, teacher, table, columns or {}, max_length)


def _encoder(
    folder: str | os.PathLike, teacher: str | os.PathLike | None, table: Any,
    columns: dict[str, str], max_length: int,
) -> dict[str, Any]:  # fmt: skip
    from .data.tables import find_column
    from .hf import load_model, load_tokenizer
    from .tasks.embedding import (
        embed,
        encoder_forward,
        neighbour_agreement,
        read_pooling,
        similarity_correlation,
        tokenize_pair,
    )

    if teacher is None:
        raise DataError("an encoder is evaluated against its teacher: give --teacher FOLDER")
    column = find_column(table, "text", columns.get("text"), ("text", "sentence", "content"),
                         "--columns")  # fmt: skip
    texts = [str(t) for t in table[column] if t is not None and str(t).strip()]
    if len(texts) < 11:
        raise DataError(f"--data: {len(texts)} texts; neighbour agreement needs more than 10")
    model, t_model = load_model(folder), load_model(teacher)
    rows = tokenize_pair(texts, load_tokenizer(teacher), load_tokenizer(folder), max_length)
    s = embed(model, rows, encoder_forward("s_", read_pooling(folder)))
    t = embed(t_model, rows, encoder_forward("t_", read_pooling(teacher)))
    return {
        "texts": len(texts),
        "neighbour_agreement@10": neighbour_agreement(s, t, 10),
        "similarity_spearman": similarity_correlation(s, t),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


__all__ = ["KINDS", "evaluate_export", "export_kind"]
