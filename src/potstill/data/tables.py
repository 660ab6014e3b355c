"""The user's own data as Arrow tables, through Hugging Face ``datasets``: local CSV / TSV, JSON
and JSON Lines, Parquet, plain text (a file, a folder of files; one example per line, paragraph
or document), image folders (one subfolder per class), folders written by
``Dataset.save_to_disk``, a dataset on the hub (name, config, split), or a built-in source of
:data:`~potstill.data.sources.SOURCES`. Splits are given as files or split names, or carved
from the training rows by size and seed. Tables from files stay memory-mapped on disk: a corpus
larger than memory is never loaded whole.

>>> splits = load_table_splits(path="reviews.csv", val_size=0.1)    # doctest: +SKIP
>>> splits["train"].column_names                                    # doctest: +SKIP
['review', 'sentiment']
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .rows import DataError

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("potstill")

SPLITS = ("train", "validation", "test")
"""The splits a run reads; a source's ``val`` / ``valid`` / ``dev`` split is its validation."""

SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}

BUILDERS = {
    ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
    ".txt": "text", ".text": "text", ".md": "text",
}  # fmt: skip
"""File suffix → the ``datasets`` builder that reads it."""

FORMATS = ("csv", "json", "parquet", "text", "imagefolder", "disk")
"""The ``format`` a source may name (otherwise found from the file suffix or folder)."""

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _files(pattern: str | Sequence[str], where: str) -> list[str]:
    """The files a path, glob or folder names (a folder: the files inside, recursively)."""
    out: list[str] = []
    for item in [pattern] if isinstance(pattern, str) else list(pattern):
        p = Path(item).expanduser()
        if any(ch in item for ch in "*?["):
            found = sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            if not found:
                raise DataError(f"{where}: no file matches {item!r}")
            out += found
        elif p.is_dir():
            found = sorted(
                str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
            )
            if not found:
                raise DataError(f"{where}: folder {item} holds no files")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise DataError(f"{where}: {item} does not exist (give a file, a glob or a folder)")
    return out


def detect_format(files: Sequence[str], where: str) -> str:
    """The builder of ``files`` from their suffixes; DataError when they are mixed or unknown."""
    kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if len(kinds) == 1 and None not in kinds:
        return next(iter(kinds))  # type: ignore[return-value]
    if kinds <= {None} and all(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
        return "imagefolder"
    unknown = sorted({Path(f).suffix or Path(f).name for f in files if not BUILDERS.get(
        Path(f).suffix.lower())})  # fmt: skip
    raise DataError(
        f"{where}: cannot tell the format of {', '.join(unknown) or 'mixed files'} "
        f"({', '.join(files[:3])}{'…' if len(files) > 3 else ''}); give format: one of "
        f"{', '.join(FORMATS)}"
    )


def _is_saved(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def _normalise(dd: Mapping[str, Dataset], where: str) -> dict[str, Dataset]:
    out: dict[str, Dataset] = {}
    for name, ds in dd.items():
        key = SPLIT_ALIASES.get(name, name)
        if key in out:
            raise DataError(f"{where}: splits {name!r} and another both mean {key!r}")
        out[key] = ds
    return out


def _read(builder: str, files: list[str], where: str, **options: Any) -> Dataset:
    """One split's files read by ``builder`` (a memory-mapped Arrow table in the datasets
    cache); DataError naming the files when they are empty or unreadable."""
    from datasets import load_dataset

    empty = [f for f in files if Path(f).stat().st_size == 0]
    if empty:
        raise DataError(f"{where}: {', '.join(empty)} is empty (0 bytes)")
    if builder == "csv" and all(f.endswith(".tsv") for f in files):
        options.setdefault("delimiter", "\t")
    try:
        return load_dataset(builder, data_files={"train": files}, split="train", **options)
    except Exception as e:  # datasets raises many kinds for an unreadable file
        if "corresponds to no data" in str(e):
            raise DataError(f"{where}: {', '.join(files)} holds no rows") from e
        raise DataError(f"{where}: cannot read {', '.join(files)} as {builder}: {e}") from e


def _from_files(
    path: str | list[str] | None,
    split_files: dict[str, str | list[str]],
    format: str | None,
    text_by: str,
    where: str,
) -> dict[str, Dataset]:
    if path is not None and isinstance(path, str):
        p = Path(path).expanduser()
        if p.is_dir() and (format == "disk" or (format is None and _is_saved(p))):
            return _from_disk(p, where)
        if p.is_dir() and format in (None, "imagefolder") and _looks_like_image_folder(p):
            format = "imagefolder"
    if format == "disk":
        raise DataError(f"{where}: format disk needs path: a folder written by save_to_disk")
    data_files = {k: _files(v, f"{where}.{k}") for k, v in split_files.items()}
    if path is not None:
        data_files = {"train": _files(path, f"{where}.path"), **data_files}
    if format == "imagefolder":
        return _read_image_folder(path, split_files, where)
    out = {}
    for split, files in data_files.items():  # each split its own format: a CSV train, JSONL test
        builder = format or detect_format(files, f"{where}.{split}")
        options: dict[str, Any] = {"sample_by": text_by} if builder == "text" else {}
        out[split] = _read(builder, files, where, **options)
    return out


def _looks_like_image_folder(folder: Path) -> bool:
    subdirs = [d for d in folder.iterdir() if d.is_dir()]
    return bool(subdirs) and any(
        f.suffix.lower() in IMAGE_SUFFIXES for d in subdirs for f in d.rglob("*")
    )


def _read_image_folder(
    path: str | list[str] | None, split_files: dict[str, str | list[str]], where: str
) -> dict[str, Dataset]:
    from datasets import load_dataset

    folders = {"train": path} if path is not None else {}
    folders.update(split_files)
    out: dict[str, Dataset] = {}
    for split, folder in folders.items():
        if not isinstance(folder, str) or not Path(folder).is_dir():
            raise DataError(f"{where}.{split}: an image folder must be one folder, got {folder!r}")
        try:
            dd = load_dataset("imagefolder", data_dir=folder)
        except Exception as e:
            raise DataError(f"{where}.{split}: cannot read {folder} as an image folder: {e}") from e
        found = _normalise(dd, where)
        if path is not None and split == "train" and set(found) - {"train"}:
            out.update(found)  # a folder with train/ and test/ inside gives both splits
        else:
            out[split] = found.get("train", next(iter(found.values())))
    return out


def _from_disk(folder: Path, where: str) -> dict[str, Dataset]:
    from datasets import Dataset, load_from_disk

    try:
        loaded = load_from_disk(str(folder))
    except Exception as e:
        raise DataError(f"{where}: cannot load {folder} (written by save_to_disk?): {e}") from e
    if isinstance(loaded, Dataset):
        return {"train": loaded}
    return _normalise(loaded, where)


def _from_hub(
    name: str, config: str | None, splits: Mapping[str, str] | None, where: str, **options: Any
) -> dict[str, Dataset]:
    from datasets import load_dataset

    try:
        dd = load_dataset(name, config, **options)
    except Exception as e:
        raise DataError(
            f"{where}: cannot load the hub dataset {name!r}"
            f"{f' (config {config!r})' if config else ''}: {e}. On a machine without hub "
            "access, save it with save_to_disk elsewhere and give that folder as path"
        ) from e
    if splits:
        missing = [s for s in splits.values() if s not in dd]
        if missing:
            raise DataError(
                f"{where}.splits: {name} has no split {', '.join(map(repr, missing))}; its "
                f"splits: {', '.join(dd)}"
            )
        return {k: dd[v] for k, v in splits.items()}
    return _normalise(dd, where)


def _from_builtin(name: str, where: str) -> dict[str, Dataset]:
    from datasets import Dataset

    from .sources import load_rows

    out = {}
    for split, rows in load_rows(name).items():
        columns = {
            k: v.tolist() if hasattr(v, "tolist") else list(v) for k, v in rows.columns.items()
        }
        out["train" if split == "all" else split] = Dataset.from_dict(columns)
    return _normalise(out, where)


def _size(size: float | int, n: int, what: str, where: str) -> int:
    count = round(size * n) if isinstance(size, float) and size < 1 else int(size)
    if not 0 < count < n:
        raise DataError(
            f"{where}.{what}: {size} leaves nothing on one side of a split of {n} rows; give a "
            f"count between 1 and {n - 1} or a fraction in (0, 1)"
        )
    return count


def carve(
    splits: dict[str, Dataset],
    *,
    val_size: float | int | None,
    test_size: float | int | None,
    seed: int,
    where: str = "data",
) -> dict[str, Dataset]:
    """``splits`` with a test split, then a validation split, carved from the training rows when
    missing and a size is given (a count, or a fraction of the training rows), with ``seed``:
    the same rows go to each side in every run."""
    out = dict(splits)
    for name, size, salt in (("test", test_size, 1), ("validation", val_size, 0)):
        if name in out or size is None:
            continue
        train = out["train"]
        n = _size(size, len(train), "test_size" if name == "test" else "val_size", where)
        parts = train.train_test_split(test_size=n, seed=seed + salt, shuffle=True)
        out["train"], out[name] = parts["train"], parts["test"]
    return out


def load_table_splits(
    *,
    path: str | list[str] | None = None,
    train: str | list[str] | None = None,
    validation: str | list[str] | None = None,
    test: str | list[str] | None = None,
    format: str | None = None,
    hub: str | None = None,
    config: str | None = None,
    splits: Mapping[str, str] | None = None,
    builtin: str | None = None,
    text_by: str = "line",
    val_size: float | int | None = None,
    test_size: float | int | None = None,
    seed: int = 0,
    where: str = "data",
    **hub_options: Any,
) -> dict[str, Dataset]:
    """The ``train`` / ``validation`` / ``test`` tables of one source (those it has).

    Give one of: ``path`` (a file, glob or folder: its format from the suffix, a
    ``save_to_disk`` folder, an image folder, or ``format``), files per split (``train``,
    ``validation``, ``test``), ``hub`` (a dataset name, with ``config``; ``splits`` maps the
    run's split names to the dataset's), or ``builtin`` (a name in ``SOURCES``). Text files
    give one example per line (``text_by: line``), paragraph or whole ``document``. Missing
    validation / test splits are carved from the training rows by ``val_size`` / ``test_size``
    and ``seed``. Errors (:class:`DataError`) name ``where`` and the file."""
    given = [k for k, v in (("path", path), ("hub", hub), ("builtin", builtin)) if v]
    per_split = {k: v for k, v in (("train", train), ("validation", validation), ("test", test))
                 if v is not None}  # fmt: skip
    if len(given) > 1 or (per_split and (hub or builtin)):
        raise DataError(f"{where}: give one of path, hub, builtin or per-split files, not several")
    if format is not None and format not in FORMATS:
        raise DataError(f"{where}.format: {format!r} is not one of {', '.join(FORMATS)}")
    if text_by not in ("line", "paragraph", "document"):
        raise DataError(f"{where}.text_by: {text_by!r} is not one of line, paragraph, document")
    if hub:
        found = _from_hub(hub, config, splits, where, **hub_options)
    elif builtin:
        found = _from_builtin(builtin, where)
    elif path is not None or per_split:
        if path is None and "train" not in per_split:
            raise DataError(f"{where}: per-split files need a train file")
        found = _from_files(path, per_split, format, text_by, where)
    else:
        raise DataError(f"{where}: no data given; give path (a file or folder), hub or builtin")
    if "train" not in found:
        raise DataError(f"{where}: the source has no train split; its splits: {', '.join(found)}")
    found = {k: v for k, v in found.items() if k in SPLITS}
    for name, ds in found.items():
        if len(ds) == 0:
            raise DataError(f"{where}: the {name} split has no rows (an empty file?)")
    return carve(found, val_size=val_size, test_size=test_size, seed=seed, where=where)


def find_column(
    ds: Dataset | Sequence[str],
    field: str,
    given: str | None,
    candidates: Sequence[str],
    where: str,
) -> str:
    """The column of ``ds`` (a table, or its column names) that holds ``field``: the one
    ``given`` in the recipe, else the first of ``candidates`` present; DataError listing the
    columns there are otherwise."""
    names = list(ds.column_names) if hasattr(ds, "column_names") else list(ds)
    if given is not None:
        if given not in names:
            raise DataError(
                f"{where}.columns.{field}: no column {given!r}; the data has columns: "
                f"{', '.join(names)}"
            )
        return given
    for c in candidates:
        if c in names:
            return c
    raise DataError(
        f"{where}: no column for {field} (looked for {', '.join(candidates)}); the data has "
        f"columns: {', '.join(names)}. Name it with columns: {{{field}: <column>}}"
    )


def as_table(data: Any, where: str = "data") -> Dataset:
    """A ``datasets.Dataset`` as it is; any other Dataset of dict rows read into one."""
    from datasets import Dataset as HFDataset

    if isinstance(data, HFDataset):
        return data
    rows = [data[i] for i in range(len(data))]
    if not rows or not isinstance(rows[0], Mapping):
        raise DataError(
            f"{where}: a Hugging Face model reads rows of named fields (a datasets.Dataset, "
            f"or a Dataset whose items are dicts such as {{'text': ..., 'label': ...}}); got "
            f"items of type {type(rows[0]).__name__ if rows else 'nothing (empty)'}"
        )
    return HFDataset.from_list([dict(r) for r in rows])
