"""The user's own data through ``datasets``: every file format read back row for row, splits
given or carved reproducibly, columns found or refused with the columns there are, labels
mapped and checked, tokenized tables batched and padded like the tokenizer pads, their cache
reused, their fingerprints following their content."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import MINILM, needs_minilm

from potstill.data.labels import (
    check_teacher_labels,
    class_names,
    encode_labels,
    model_label_names,
)
from potstill.data.rows import DataError
from potstill.data.tables import carve, detect_format, find_column, load_table_splits
from potstill.data.tensors import fingerprint, make_batch

ROWS = [
    {"text": "the compiler crashed again", "label": "computers"},
    {"text": "vote early and vote often", "label": "politics"},
    {"text": "entropy always increases", "label": "science"},
    {"text": "my disk is full", "label": "computers"},
    {"text": "the senate adjourned", "label": "politics"},
    {"text": "light bends near mass", "label": "science"},
    {"text": "segfault at line nine", "label": "computers"},
    {"text": "taxes went up", "label": "politics"},
    {"text": "atoms are mostly empty", "label": "science"},
    {"text": "reboot and pray", "label": "computers"},
]


def write_all_formats(folder: Path) -> dict[str, Path]:
    """The same ten rows as CSV, TSV, JSON Lines, a JSON array and Parquet."""
    import pandas as pd

    out = {}
    for name, delim in (("rows.csv", ","), ("rows.tsv", "\t")):
        with open(folder / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"], delimiter=delim)
            w.writeheader()
            w.writerows(ROWS)
        out[name] = folder / name
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "rows.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_parquet(folder / "rows.parquet")
    for name in ("rows.jsonl", "rows.json", "rows.parquet"):
        out[name] = folder / name
    return out


@pytest.mark.parametrize(
    "name", ["rows.csv", "rows.tsv", "rows.jsonl", "rows.json", "rows.parquet"]
)
def test_every_table_format_reads_back_the_rows(tmp_path, name):
    files = write_all_formats(tmp_path)
    splits = load_table_splits(path=str(files[name]))
    assert list(splits) == ["train"]
    assert splits["train"].to_list() == ROWS


def test_text_files_by_line_paragraph_and_document(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\nnew paragraph\n")
    (tmp_path / "b.txt").write_text("other file\n")
    by_line = load_table_splits(path=str(tmp_path / "a.txt"))["train"]["text"]
    assert by_line == ["first line", "second line", "", "new paragraph"]
    by_par = load_table_splits(path=str(tmp_path / "a.txt"), text_by="paragraph")["train"]["text"]
    assert [p.strip() for p in by_par] == ["first line\nsecond line", "new paragraph"]
    docs = load_table_splits(path=str(tmp_path), text_by="document")["train"]["text"]
    assert sorted(d.strip() for d in docs) == sorted(
        [(tmp_path / "a.txt").read_text().strip(), "other file"]
    )
    globbed = load_table_splits(path=str(tmp_path / "*.txt"))["train"]["text"]
    assert len(globbed) == 5


def test_save_to_disk_folders_dataset_and_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert load_table_splits(path=str(tmp_path / "one"))["train"].to_list() == ROWS
    DatasetDict({"train": ds.select(range(7)), "dev": ds.select(range(7, 10))}).save_to_disk(
        str(tmp_path / "dict")
    )
    splits = load_table_splits(path=str(tmp_path / "dict"))
    assert set(splits) == {"train", "validation"}  # "dev" is the validation split
    assert splits["validation"].to_list() == ROWS[7:]


def test_image_folder_gives_images_and_class_labels(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (8, 8), color=40 * i + (100 if cls == "dog" else 0)).save(
                tmp_path / cls / f"{i}.png"
            )
    train = load_table_splits(path=str(tmp_path))["train"]
    assert len(train) == 6 and train.features["label"].names == ["cat", "dog"]
    assert sorted(train["label"]) == [0, 0, 0, 1, 1, 1]
    assert train[0]["image"].size == (8, 8)


def test_per_split_files_and_carved_splits_are_reproducible(tmp_path):
    files = write_all_formats(tmp_path)
    given = load_table_splits(train=str(files["rows.csv"]), test=str(files["rows.jsonl"]))
    assert set(given) == {"train", "test"} and len(given["test"]) == 10
    a = load_table_splits(path=str(files["rows.csv"]), val_size=2, test_size=0.3, seed=3)
    b = load_table_splits(path=str(files["rows.csv"]), val_size=2, test_size=0.3, seed=3)
    c = load_table_splits(path=str(files["rows.csv"]), val_size=2, test_size=0.3, seed=4)
    assert {k: len(v) for k, v in a.items()} == {"train": 5, "validation": 2, "test": 3}
    assert all(a[k].to_list() == b[k].to_list() for k in a)
    assert a["test"].to_list() != c["test"].to_list()
    texts = sorted(r["text"] for split in a.values() for r in split)
    assert texts == sorted(r["text"] for r in ROWS)  # every row in exactly one split
    with pytest.raises(DataError, match="val_size: 10 leaves nothing"):
        carve(dict(given), val_size=10, test_size=None, seed=0)


def test_bad_sources_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"data.path: .*missing.csv does not exist"):
        load_table_splits(path=str(tmp_path / "missing.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv"):
        load_table_splits(path=str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="header.csv holds no rows"):
        load_table_splits(path=str(tmp_path / "header.csv"))
    (tmp_path / "rows.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"cannot tell the format of \.xlsx.*give format"):
        load_table_splits(path=str(tmp_path / "rows.xlsx"))
    with pytest.raises(DataError, match="no data given"):
        load_table_splits()
    with pytest.raises(DataError, match="not several"):
        load_table_splits(path="a.csv", hub="imdb")
    with pytest.raises(
        DataError, match="cannot load the hub dataset 'no-such/dataset'.*save_to_disk"
    ):
        load_table_splits(hub="no-such/dataset")
    assert detect_format(["a.jsonl", "b.json"], "data") == "json"


def test_find_column_lists_the_columns_there_are():
    from datasets import Dataset

    ds = Dataset.from_list(ROWS)
    assert find_column(ds, "text", None, ("sentence", "text"), "data") == "text"
    with pytest.raises(DataError, match=r"columns.text: no column 'review'; the data has "
                       r"columns: text, label"):  # fmt: skip
        find_column(ds, "text", "review", (), "data")
    with pytest.raises(DataError, match=r"no column for label \(looked for y, target\); the "
                       r"data has columns: text, label"):  # fmt: skip
        find_column(ds, "label", None, ("y", "target"), "data")


def test_labels_mapped_left_out_or_refused():
    from datasets import ClassLabel, Dataset, Features, Value

    ds = Dataset.from_list(ROWS)
    assert class_names(ds, "label") == ["computers", "politics", "science"]
    tables, dropped = encode_labels({"train": ds}, "label", ["science", "computers"],
                                    drop_unknown=True)  # fmt: skip
    assert dropped == {"train": 3}
    assert tables["train"]["label"] == [1, 0, 1, 0, 1, 0, 1]
    with pytest.raises(DataError, match=r"3 rows whose 'label' is not one of the 2 classes "
                       r"\(science, computers\): e.g. politics"):  # fmt: skip
        encode_labels({"train": ds}, "label", ["science", "computers"], drop_unknown=False)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    cl = Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]}, features=features)
    assert class_names(cl, "label") == ["neg", "pos"]
    # a ClassLabel column is mapped by name: the data's order need not be the teacher's
    out, _ = encode_labels({"t": cl}, "label", ["pos", "neg"], drop_unknown=False)
    assert out["t"]["label"] == [0, 1, 0]
    ints = Dataset.from_dict({"text": ["a", "b"], "label": [0, 2]})
    assert class_names(ints, "label") == ["0", "1", "2"]


def test_teacher_label_checks_name_both_sides():
    from transformers import BertConfig

    unnamed = BertConfig(num_labels=3)
    assert model_label_names(unnamed) is None
    check_teacher_labels(["a", "b", "c"], unnamed)
    with pytest.raises(DataError, match=r"the data has 2 classes \(a, b\) but the teacher "
                       r"predicts 3"):  # fmt: skip
        check_teacher_labels(["a", "b"], unnamed)
    named = BertConfig(id2label={0: "neg", 1: "pos"})
    assert model_label_names(named) == ["neg", "pos"]
    with pytest.raises(DataError, match=r"labels \(neg, pos\) are not the data's classes "
                       r"\(pos, neg\)"):  # fmt: skip
        check_teacher_labels(["pos", "neg"], named)


@needs_minilm
def test_tokenized_table_batches_pad_like_the_tokenizer_and_count_cuts(tmp_path):
    from transformers import AutoTokenizer

    from potstill.data.tokenized import TableDataset, tokenize_table

    tok = AutoTokenizer.from_pretrained(MINILM)
    files = write_all_formats(tmp_path)
    table = load_table_splits(path=str(files["rows.jsonl"]))["train"]
    long = [len(tok(r["text"])["input_ids"]) > 7 for r in ROWS]
    tokenized, cut = tokenize_table(table, tok, "text", max_length=7)
    assert cut == sum(long) > 0
    ds = TableDataset(
        tokenized,
        {"input_ids": "input_ids", "attention_mask": "attention_mask"},
        pad={"input_ids": tok.pad_token_id, "attention_mask": 0},
    )
    index = torch.tensor([3, 0, 9])
    batch = make_batch(ds, index)
    expected = tok([ROWS[i]["text"] for i in index], padding="longest", truncation=True,
                   max_length=7, return_tensors="pt")  # fmt: skip
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert torch.equal(batch["index"], index)
    real = int(expected["attention_mask"][0].sum())
    assert torch.equal(ds[3]["input_ids"], expected["input_ids"][0][:real])  # unpadded alone


@needs_minilm
def test_tokenization_is_cached_on_disk_and_reused(tmp_path):
    from transformers import AutoTokenizer

    from potstill.data.tokenized import tokenize_table

    tok = AutoTokenizer.from_pretrained(MINILM)
    lines = [f"line {i} of a corpus that is long enough to time" for i in range(20000)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    table = load_table_splits(path=str(tmp_path / "corpus.txt"))["train"]
    t = time.perf_counter()
    first, _ = tokenize_table(table, tok, "text", max_length=32)
    first_s = time.perf_counter() - t
    again = load_table_splits(path=str(tmp_path / "corpus.txt"))["train"]
    t = time.perf_counter()
    second, _ = tokenize_table(again, tok, "text", max_length=32)
    second_s = time.perf_counter() - t
    assert first.cache_files and first.cache_files[0]["filename"].endswith(".arrow")
    assert {f["filename"] for f in second.cache_files} & {f["filename"] for f in first.cache_files}
    assert second["input_ids"][:5] == first["input_ids"][:5]
    assert second_s < first_s  # read back, not tokenized again


def test_table_fingerprint_follows_content_not_chunking():
    from datasets import Dataset, concatenate_datasets

    from potstill.data.tokenized import TableDataset

    rows = {"input_ids": [[1, 2, 3], [4, 5], [6]], "label": [0, 1, 0]}
    one = TableDataset(Dataset.from_dict(rows), {"input_ids": "input_ids", "label": "label"})
    chunked = concatenate_datasets(
        [Dataset.from_dict({k: v[:1] for k, v in rows.items()}),
         Dataset.from_dict({k: v[1:] for k, v in rows.items()})]
    )  # fmt: skip
    two = TableDataset(chunked, {"input_ids": "input_ids", "label": "label"})
    assert fingerprint(one) == fingerprint(two)
    relabelled = TableDataset(
        Dataset.from_dict({**rows, "label": [1, 1, 1]}),
        {"input_ids": "input_ids", "label": "label"},
    )
    assert fingerprint(relabelled) != fingerprint(one)
    assert fingerprint(relabelled, inputs_only=True) == fingerprint(one, inputs_only=True)
    moved = TableDataset(
        Dataset.from_dict({**rows, "input_ids": [[1, 2], [3, 4, 5], [6]]}),
        {"input_ids": "input_ids", "label": "label"},
    )
    assert fingerprint(moved, inputs_only=True) != fingerprint(one, inputs_only=True)


def test_classes_for_a_teacher_index_its_head():
    from datasets import Dataset
    from transformers import BertConfig

    from potstill.data.labels import classes_for

    words = Dataset.from_list(ROWS)
    assert classes_for(words, "label", given=["science", "politics"]) == ["science", "politics"]
    assert classes_for(words, "label") == ["computers", "politics", "science"]
    named = BertConfig(id2label={0: "x", 1: "y"})
    assert classes_for(words, "label", config=named) == ["x", "y"]  # the teacher's names win
    # integer labels (or digit strings) index an unnamed head: 0 … num_labels − 1, numerically
    digits = Dataset.from_dict({"text": ["a", "b", "c"], "label": ["1", "2", "10"]})
    assert classes_for(digits, "label", config=BertConfig(num_labels=11)) == [
        str(i) for i in range(11)
    ]
    assert classes_for(digits, "label") == ["1", "10", "2"]  # no head: the values, sorted
