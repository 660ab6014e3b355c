"""Tests for potstill.data: splits, stratified label hiding, fingerprints, batching and the
Fashion-MNIST IDX loader."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from conftest import FASHION_FILES, needs_fashion_mnist
from torch.utils.data import Dataset, TensorDataset

from potstill.data.images import FASHION_MNIST_DIR, load_digits_tensors, load_fashion_mnist
from potstill.data.rows import DataError
from potstill.data.splits import IGNORE_INDEX, hide_labels, labelled_only, load_splits
from potstill.data.tensors import epoch_order, fingerprint, iterate_batches, make_batch

# ---- digits splits ---------------------------------------------------------------------------


def test_digits_splits_partition_the_data(digits):
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sizes == [1151, 287, 359]
    assert digits.input_shape == (1, 8, 8)
    assert digits.classes == tuple(str(i) for i in range(10))
    # every example lands in exactly one split
    rows = torch.cat([s.tensors[0] for s in (digits.train, digits.val, digits.test)])
    flat = {tuple(r.flatten().tolist()) for r in rows}
    assert flat == {tuple(r.flatten().tolist()) for r in x}  # digits has duplicates: sets
    assert len(rows) == len(x)
    labels = torch.cat([s.tensors[1] for s in (digits.train, digits.val, digits.test)])
    assert torch.equal(labels.bincount(), y.bincount())


def test_splits_depend_on_the_seed_only(digits):
    again = load_splits("digits")
    assert torch.equal(again.train.tensors[0], digits.train.tensors[0])
    other = load_splits("digits", seed=1)
    assert not torch.equal(other.train.tensors[0], digits.train.tensors[0])


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="'cifar'.*fashion-mnist.*digits"):
        load_splits("cifar")


# ---- hide_labels -----------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_hide_labels_keeps_a_stratified_fraction(digits, fraction):
    x, y = digits.train.tensors
    hidden = hide_labels(digits.train, fraction, seed=0)
    hx, hy = hidden.tensors
    assert torch.equal(hx, x)  # every input stays: the teacher labels the rest
    kept = hy != IGNORE_INDEX
    assert set(hy[~kept].tolist()) <= {IGNORE_INDEX}
    assert torch.equal(hy[kept], y[kept])  # kept labels are the true ones
    for c in range(10):
        n_c = int((y == c).sum())
        assert int((hy == c).sum()) == max(1, round(fraction * n_c)), c
    assert int(kept.sum()) == pytest.approx(fraction * len(y), abs=10)
    assert int((digits.train.tensors[1] == IGNORE_INDEX).sum()) == 0  # the source untouched


def test_hide_labels_is_seeded(digits):
    a = hide_labels(digits.train, 0.2, seed=0).tensors[1]
    b = hide_labels(digits.train, 0.2, seed=0).tensors[1]
    c = hide_labels(digits.train, 0.2, seed=1).tensors[1]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_hide_labels_fraction_one_keeps_all_and_copies(digits):
    full = hide_labels(digits.train, 1.0, seed=0)
    assert torch.equal(full.tensors[1], digits.train.tensors[1])
    full.tensors[1][0] = IGNORE_INDEX
    assert digits.train.tensors[1][0] != IGNORE_INDEX  # labels were copied, not shared


def test_hide_labels_keeps_at_least_one_per_class():
    ds = TensorDataset(torch.zeros(30, 2), torch.tensor([0] * 20 + [1] * 9 + [2]))
    hy = hide_labels(ds, 0.01, seed=0).tensors[1]
    assert sorted(hy[hy != IGNORE_INDEX].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_hide_labels_rejects_bad_fractions(digits, fraction):
    with pytest.raises(DataError, match="labelled_fraction"):
        hide_labels(digits.train, fraction, seed=0)


def test_labelled_only(digits):
    hidden = hide_labels(digits.train, 0.2, seed=0)
    lab = labelled_only(hidden)
    keep = hidden.tensors[1] != IGNORE_INDEX
    assert len(lab) == int(keep.sum())
    assert torch.equal(lab.tensors[0], digits.train.tensors[0][keep])
    assert torch.equal(lab.tensors[1], digits.train.tensors[1][keep])


# ---- fingerprint -----------------------------------------------------------------------------


class _Items(Dataset):
    def __init__(self, ds: TensorDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


@pytest.mark.parametrize("wrap", [lambda d: d, _Items], ids=["tensors", "items"])
def test_fingerprint_follows_content(digits, wrap):
    x, y = digits.val.tensors
    base = fingerprint(wrap(TensorDataset(x, y)))
    assert base == fingerprint(wrap(TensorDataset(x.clone(), y.clone())))
    assert len(base) == 64 and int(base, 16) >= 0

    x2 = x.clone()
    x2[5, 0, 4, 4] = 1.0 - x2[5, 0, 4, 4]
    assert fingerprint(wrap(TensorDataset(x2, y))) != base
    y2 = y.clone()
    y2[0] = (y2[0] + 1) % 10
    assert fingerprint(wrap(TensorDataset(x, y2))) != base
    # inputs only: a relabelling keeps the fingerprint, a pixel does not
    inputs = fingerprint(wrap(TensorDataset(x, y)), inputs_only=True)
    assert fingerprint(wrap(TensorDataset(x, y2)), inputs_only=True) == inputs
    assert fingerprint(wrap(TensorDataset(x2, y)), inputs_only=True) != inputs
    # order matters: the cache is indexed by position
    perm = torch.arange(len(y)).flip(0)
    assert fingerprint(wrap(TensorDataset(x[perm], y[perm])), inputs_only=True) != inputs


def test_fingerprint_sees_dtype_and_shape():
    a = torch.zeros(4, 6)
    assert fingerprint(TensorDataset(a)) != fingerprint(TensorDataset(a.double()))
    assert fingerprint(TensorDataset(a)) != fingerprint(TensorDataset(a.reshape(4, 2, 3)))


# ---- batching --------------------------------------------------------------------------------


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(100, seed=3, epoch=0)
    assert torch.equal(a.sort().values, torch.arange(100))
    assert torch.equal(a, epoch_order(100, seed=3, epoch=0))
    assert not torch.equal(a, epoch_order(100, seed=3, epoch=1))
    assert not torch.equal(a, epoch_order(100, seed=4, epoch=0))
    assert torch.equal(epoch_order(100, seed=3, epoch=5, shuffle=False), torch.arange(100))


def test_iterate_batches_covers_the_order_from_start(digits):
    order = epoch_order(len(digits.val), seed=0, epoch=0)
    batches = list(iterate_batches(digits.val, order, 50))
    assert [len(b["index"]) for b in batches] == [50] * 5 + [37]
    assert torch.equal(torch.cat([b["index"] for b in batches]), order)
    later = list(iterate_batches(digits.val, order, 50, start=4))
    assert len(later) == 2
    assert torch.equal(later[0]["index"], batches[4]["index"])


def test_make_batch_agrees_for_tensor_and_item_datasets(digits):
    index = torch.tensor([3, 0, 200, 3])
    a = make_batch(digits.val, index)
    b = make_batch(_Items(digits.val), index)
    assert set(a) == set(b) == {"input", "label", "index"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x, y = digits.val.tensors
    assert torch.equal(a["input"], x[index])
    unlabelled = make_batch(TensorDataset(x), index)
    assert set(unlabelled) == {"input", "index"}


# ---- Fashion-MNIST ---------------------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_loader_shapes_and_ranges():
    train, test = load_fashion_mnist()
    assert len(train) == 60000 and len(test) == 10000
    for ds in (train, test):
        x, y = ds.tensors
        assert x.shape[1:] == (1, 28, 28)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert torch.equal(y.unique(), torch.arange(10))
        assert torch.equal(y.bincount(), torch.full((10,), len(y) // 10))  # balanced
    # values are byte / 255: check one image against the raw file
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    first = torch.from_numpy(raw[:784].astype(np.float32) / 255).reshape(1, 28, 28)
    assert torch.equal(test.tensors[0][0], first)


def test_missing_data_dir_names_the_file_and_the_package(tmp_path):
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in message
    assert "dataset-fashion-mnist" in message
    assert "--data-dir" in message
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_splits("fashion-mnist", data_dir=str(tmp_path))


def test_damaged_or_mismatched_idx_files(tmp_path):
    def write(name: str, header: bytes, body: bytes) -> None:
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(header + body)

    write(FASHION_FILES[0], b"\0" * 16, bytes(784 * 3))
    write(FASHION_FILES[1], b"\0" * 8, bytes([1, 2, 3]))
    write(FASHION_FILES[2], b"\0" * 16, bytes(784 * 2))
    write(FASHION_FILES[3], b"\0" * 8, bytes([4, 5]))
    train, test = load_fashion_mnist(tmp_path)  # a tiny but well-formed set loads
    assert train.tensors[0].shape == (3, 1, 28, 28)
    assert test.tensors[1].tolist() == [4, 5]

    write(FASHION_FILES[3], b"\0" * 8, bytes([4, 5, 6]))  # one label too many
    with pytest.raises(DataError, match="t10k.*784 bytes per label"):
        load_fashion_mnist(tmp_path)

    (tmp_path / FASHION_FILES[0]).write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip IDX file"):
        load_fashion_mnist(tmp_path)


def test_split_off_rejects_bad_sizes(digits):
    from potstill.data.splits import split_off

    with pytest.raises(DataError, match="val_size"):
        split_off(digits.val, len(digits.val), seed=0)
    rest, val = split_off(digits.val, 7, seed=0)
    assert (len(rest), len(val)) == (len(digits.val) - 7, 7)


# --- data sources: rows by split and column, mapped to a task's fields ---------------------


def test_every_built_in_corpus_is_a_data_source():
    from potstill.data.sources import SOURCES, load_rows

    assert set(SOURCES) == {"fashion-mnist", "digits", "fortunes", "instructions", "prompts"}
    digits = load_rows("digits")["all"]
    assert len(digits) == 1797 and set(digits.columns) == {"image", "label"}
    assert tuple(digits.column("image").shape) == (1797, 1, 8, 8)
    assert digits.meta["input_shape"] == (1, 8, 8)
    instr = load_rows("instructions")
    from potstill.data.instructions import instructions

    assert instr["val"].column("prompt") == instructions("val")


def test_a_missing_column_or_source_is_named(tmp_path):
    from potstill.data.rows import DataError
    from potstill.data.sources import load_rows
    from potstill.data.splits import load_splits

    with pytest.raises(DataError, match="unknown dataset 'mnist'; data sources: fashion-mnist"):
        load_rows("mnist")
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    rows = load_rows("prompts", path=path)["all"]
    assert [p.text() for p in rows.column("prompt")] == ["hi", "yo"]
    with pytest.raises(DataError, match=r"p.jsonl has no column 'image'; its columns: id, prompt"):
        rows.fields({"input": "image"})
    with pytest.raises(DataError, match="digits has no column 'pixels'; its columns: image, label"):
        load_splits("digits", columns={"input": "pixels", "label": "label"})


def test_splits_read_a_source_through_the_column_mapping():
    from potstill.data.images import load_digits_tensors
    from potstill.data.splits import load_splits

    a = load_splits("digits", val_size=100, seed=3)
    b = load_splits("digits", val_size=100, seed=3, columns={"input": "image", "label": "label"})
    assert all(torch.equal(x, y) for x, y in zip(a.test.tensors, b.test.tensors, strict=True))
    x, y = load_digits_tensors()
    # every example lands in exactly one split, unchanged
    total = sum(len(s) for s in (a.train, a.val, a.test))
    assert total == len(y) and a.classes == tuple(str(i) for i in range(10))
    joined = torch.cat([a.train.tensors[0], a.val.tensors[0], a.test.tensors[0]])
    assert sorted(joined.flatten(1).sum(1).tolist()) == sorted(x.flatten(1).sum(1).tolist())
