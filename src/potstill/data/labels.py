"""Class labels of a table: the class names (given, from a ``ClassLabel`` column, from a
teacher's ``id2label``, or the values found), each row's label as a class index in a ``label``
column, rows with a label outside the classes counted, and labels a teacher cannot predict
refused before any training."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .rows import DataError

if TYPE_CHECKING:
    from datasets import Dataset as Table

log = logging.getLogger("potstill")

LABEL_COLUMNS = ("label", "labels", "class", "category", "target")
"""Columns looked for, in order, when the label column is not named."""

_DEFAULT_NAME = re.compile(r"LABEL_\d+")
_NEW = "__potstill_label__"


def model_label_names(config: Any) -> list[str] | None:
    """The label names of a classifier's config (``id2label``), or None when they are the
    ``LABEL_0``, ``LABEL_1``, … that transformers makes up for an unnamed head."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    if not names or all(_DEFAULT_NAME.fullmatch(n) for n in names):
        return None
    return names


def class_names(table: Table, column: str, given: Sequence[str] | None = None) -> list[str]:
    """The classes of ``column``: ``given``; else a ``ClassLabel`` feature's names; else the
    distinct values found (integers 0…K−1 named by their digits, other values sorted)."""
    if given:
        return [str(g) for g in given]
    feature = table.features.get(column)
    if getattr(feature, "names", None):
        return list(feature.names)  # type: ignore[union-attr]
    values = set(table.unique(column))
    values.discard(None)
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values) + 1)]  # type: ignore[type-var]
    return sorted(str(v) for v in values)


def classes_for(
    table: Table, column: str, *, given: Sequence[str] | None = None, config: Any = None
) -> list[str]:
    """The classes a run trains on: ``given`` (the recipe's list); else, for a classifier
    whose ``config`` is given, the labels it names in ``id2label``, or ``0 … num_labels − 1``
    when the data's labels are integers (they index its head); else the data's own
    (:func:`class_names`)."""
    if given:
        return [str(g) for g in given]
    if config is not None:
        named = model_label_names(config)
        if named is not None:
            return named
    found = class_names(table, column)
    if config is not None and all(v.isdigit() for v in found):
        return [str(i) for i in range(config.num_labels)]
    return found


def encode_labels(
    tables: Mapping[str, Table],
    column: str,
    names: Sequence[str],
    *,
    drop_unknown: bool,
    where: str = "data",
) -> tuple[dict[str, Table], dict[str, int]]:
    """Each table with an integer ``label`` column (the index of its row's class in
    ``names``) and the number of rows left out per split. A row whose label is none of
    ``names`` is left out with ``drop_unknown`` (the recipe listed the classes it wants),
    otherwise an error naming the split, the value and the classes."""
    index = {n: i for i, n in enumerate(names)}
    out, dropped = {}, {}
    for split, table in tables.items():
        feature = table.features.get(column)
        class_label = getattr(feature, "names", None)

        def to_index(rows: dict[str, list[Any]], class_label=class_label) -> dict[str, list]:
            labels = []
            for v in rows[column]:
                key = class_label[v] if class_label and isinstance(v, int) and v >= 0 else v
                labels.append(index.get(str(key), -1) if key is not None else -1)
            return {_NEW: labels}

        mapped = table.map(to_index, batched=True, desc=f"labels of {split}")
        n_unknown = _count_negative(mapped, _NEW)  # counted by Arrow: no pass over the rows
        if n_unknown and not drop_unknown:
            unknown = mapped.filter(lambda r: [x < 0 for x in r[_NEW]], batched=True)
            sample = unknown.select(range(min(len(unknown), 1000)))[column]
            seen = sorted({str(v) for v in sample})[:5]
            raise DataError(
                f"{where}: the {split} split has {n_unknown} rows whose {column!r} is not "
                f"one of the {len(names)} classes ({_short(names)}): e.g. {', '.join(seen)}. "
                "List the classes you want in data.labels (other rows are then left out), or "
                "fix the data"
            )
        if n_unknown:
            mapped = mapped.filter(lambda r: [x >= 0 for x in r[_NEW]], batched=True)
            log.info(
                "%s: %d of %d %s rows have a label outside data.labels; left out",
                where, n_unknown, len(table), split,
            )  # fmt: skip
        if "label" in mapped.column_names:
            mapped = mapped.remove_columns("label")
        mapped = mapped.rename_column(_NEW, "label")
        dropped[split] = n_unknown
        out[split] = mapped
    return out, dropped


def _count_negative(table: Table, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(pc.less(table.data.column(column), 0), "int64")).as_py() or 0)


def check_teacher_labels(
    names: Sequence[str], config: Any, *, who: str = "teacher", where: str = "data"
) -> None:
    """Refuse a classifier whose head does not fit the data's classes: another number of
    labels, or named labels other than the data's (in order)."""
    n = getattr(config, "num_labels", None)
    if n != len(names):
        raise DataError(
            f"{where}: the data has {len(names)} classes ({_short(names)}) but the {who} "
            f"predicts {n}; give a {who} trained on these classes, or list its classes in "
            "data.labels"
        )
    own = model_label_names(config)
    if own is not None and list(own) != list(names):
        raise DataError(
            f"{where}: the {who}'s labels ({_short(own)}) are not the data's classes "
            f"({_short(names)}) in the same order; list them in data.labels in the {who}'s "
            "order"
        )


def _short(names: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(map(str, names[:n]))
    return shown + (f", … {len(names) - n} more" if len(names) > n else "")


def head_config(classes: Sequence[str]) -> dict[str, Any]:
    """The config fields of a classification head for ``classes`` (its number and names)."""
    return {
        "num_labels": len(classes),
        "id2label": dict(enumerate(classes)),
        "label2id": {c: i for i, c in enumerate(classes)},
    }


def classifier_tables(
    tables: Mapping[str, Any],
    teacher_config: Any,
    student_config: Any,
    columns: Mapping[str, str] | None,
    field: str,
    candidates: Sequence[str],
) -> tuple[dict[str, Table], str, list[str]]:
    """What ``potstill.distill`` reads for two Hugging Face classifiers from rows of named
    fields (a ``datasets.Dataset`` or any Dataset of dict rows): the tables with an integer
    ``label`` column, the input column (``field``, named in ``columns`` or the first of
    ``candidates``) and the class names (the teacher's ``id2label`` when it names them; string
    labels are mapped by name), both heads checked against them."""
    from .tables import as_table, find_column

    columns = dict(columns or {})
    named = {k: as_table(v, f"{k} data") for k, v in tables.items()}
    first = named["train"]
    column = find_column(first, field, columns.get(field), candidates, "columns")
    label = find_column(first, "label", columns.get("label"), LABEL_COLUMNS, "columns")
    names = classes_for(first, label, config=teacher_config)
    check_teacher_labels(names, teacher_config)
    check_teacher_labels(names, student_config, who="student")
    encoded, _ = encode_labels(named, label, names, drop_unknown=False, where="data")
    return encoded, column, names
