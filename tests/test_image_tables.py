"""Your images on the classic road: a Fashion-MNIST subset written out as an image folder
(``train/`` and ``test/``, one subfolder per class) reads back as exactly the built-in road's
tensors, and a classic recipe on that folder gives the same results, figure for figure, as the
same recipe on the same rows taken from the IDX files, with built-in models and with Hugging
Face image classifiers; mixed sizes and unnamed labels are
refused with what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import needs_fashion_mnist

from potstill.data.images import FASHION_MNIST_CLASSES, load_fashion_mnist
from potstill.data.rows import DataError, Rows

N_TRAIN, N_TEST = 300, 100


def write_image_folder(root: Path) -> None:
    """The first N_TRAIN / N_TEST Fashion-MNIST images as PNGs named by their index."""
    from PIL import Image

    train, test = load_fashion_mnist()
    for split, ds, n in (("train", train, N_TRAIN), ("test", test, N_TEST)):
        x, y = ds.tensors
        for i in range(n):
            folder = root / split / FASHION_MNIST_CLASSES[int(y[i])].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (x[i, 0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")


def folder_order(root: Path, split: str) -> list[int]:
    """The IDX index of each row in the order the image folder is read."""
    from datasets import Image, load_dataset

    ds = load_dataset("imagefolder", data_dir=str(root), split=split)
    paths = ds.cast_column("image", Image(decode=False))["image"]
    return [int(Path(p["path"]).stem) for p in paths]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist-folder")
    write_image_folder(root)
    return root


@needs_fashion_mnist
def test_an_image_folder_reads_back_as_the_builtin_tensors(image_folder):
    from potstill.data.image_tables import ImageTable, image_tables

    tables = image_tables(path=str(image_folder))
    train, test = load_fashion_mnist()
    assert set(tables) == {"train", "test"}
    names = tables["train"].meta["classes"]  # the folder names, sorted
    for split, ds in (("train", train), ("test", test)):
        order = folder_order(image_folder, split)
        x, y = ds.tensors
        table = tables[split]
        assert isinstance(table, ImageTable) and len(table) == len(order)
        batch = table.batch(torch.arange(len(table)))
        assert torch.equal(batch["input"], x[order])  # pixel for pixel
        got = [names[i] for i in batch["label"].tolist()]
        assert got == [FASHION_MNIST_CLASSES[int(c)].replace("/", "-") for c in y[order]]
        some = torch.tensor([5, 0, 3])
        assert torch.equal(table.select(some).batch(torch.arange(3))["input"], x[order][some])
        assert torch.equal(table[7][0], x[order][7])
    assert tables["train"].meta["input_shape"] == (1, 28, 28)


@needs_fashion_mnist
def test_an_image_table_is_read_batch_by_batch_and_fingerprinted_by_its_bytes(image_folder):
    from potstill.data.image_tables import image_tables
    from potstill.data.tensors import fingerprint

    table = image_tables(path=str(image_folder))["train"]
    reads = []
    original = table.table.__class__.__getitem__

    def counting(self, key):
        reads.append(len(key) if isinstance(key, list) else 1)
        return original(self, key)

    table.table.__class__.__getitem__ = counting
    try:
        table.batch(torch.tensor([3, 1, 4]))
    finally:
        table.table.__class__.__getitem__ = original
    assert reads == [3]  # only the batch's rows were read
    again = image_tables(path=str(image_folder))["train"]
    assert fingerprint(table) == fingerprint(again)
    assert fingerprint(table, inputs_only=True) == fingerprint(
        table.relabel(torch.zeros(len(table), dtype=torch.int64)), inputs_only=True
    )  # labels do not change what the teacher reads
    assert fingerprint(table) != fingerprint(table.select(torch.arange(len(table) - 1)))
    assert fingerprint(table) != fingerprint(table.relabel(table.labels.flip(0)))


BUILTIN_MODELS = {
    "teacher": {"arch": {"kind": "mlp", "hidden": [32]}},
    "student": {"arch": {"kind": "mlp", "hidden": [8]}},
}
HF_MODELS = {  # Hugging Face image classifiers built from configs
    "teacher": {"config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16],
                           "depths": [1, 1]}},
    "student": {"config": {"model_type": "vit", "patch_size": 7, "hidden_size": 16,
                           "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 32}},
}  # fmt: skip


@needs_fashion_mnist
@pytest.mark.parametrize("models", [BUILTIN_MODELS, HF_MODELS], ids=["builtin", "hugging-face"])
def test_a_classic_recipe_on_the_folder_matches_the_builtin_road(image_folder, tmp_path, models):
    from potstill.data.sources import SOURCES
    from potstill.recipe import validate_recipe
    from potstill.runs import run

    train, test = load_fashion_mnist()
    folder_names = sorted(c.replace("/", "-") for c in FASHION_MNIST_CLASSES)
    remap = torch.tensor([folder_names.index(c.replace("/", "-")) for c in FASHION_MNIST_CLASSES])

    def same_rows(**_):  # the same images from the IDX files, in the folder's order and labels
        out = {}
        for split, ds in (("train", train), ("test", test)):
            order = folder_order(image_folder, split)
            x, y = ds.tensors
            meta = {"classes": tuple(folder_names), "input_shape": (1, 28, 28)}
            out[split] = Rows({"image": x[order], "label": remap[y[order]]}, "idx", meta)
        return out

    SOURCES["fmnist-subset"] = same_rows
    try:
        common = {
            "seed": 0,
            "teacher": {**models["teacher"],
                        "train": {"epochs": 1, "batch_size": 50, "progress": False}},
            "student": models["student"],
            "train": {"epochs": 2, "batch_size": 50, "progress": False},
            "evaluation": {"measure_cache_speedup": False},
        }  # fmt: skip
        folder = run(
            validate_recipe(
                {
                    **common,
                    "name": "folder",
                    "data": {"source": {"path": str(image_folder)}, "val_size": 50},
                }
            ),
            tmp_path / "folder",
        )
        builtin = run(validate_recipe({**common, "name": "folder", "data": {
            "name": "fmnist-subset", "val_size": 50}}), tmp_path / "builtin")  # fmt: skip
    finally:
        del SOURCES["fmnist-subset"]
    assert (folder["data"]["train"], builtin["data"]["train"]) == (N_TRAIN - 50, N_TRAIN - 50)
    assert folder["data"]["test"] == N_TEST
    assert folder["data"]["name"] == f"images from {image_folder}"
    for f_set, b_set in zip(folder["settings"], builtin["settings"], strict=True):
        for kind in ("distilled", "baseline"):
            assert f_set["runs"][kind]["accuracy"] == b_set["runs"][kind]["accuracy"]
            assert f_set["runs"][kind]["agreement"] == b_set["runs"][kind]["agreement"]
    assert folder["teacher"]["accuracy"] == builtin["teacher"]["accuracy"]


def test_mixed_sizes_and_unnamed_labels_are_refused(tmp_path):
    from PIL import Image

    from potstill.data.image_tables import image_tables

    for cls, size in (("a", (8, 8)), ("b", (6, 6))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("L", size, 100).save(tmp_path / "imgs" / cls / "0.png")
    with pytest.raises(DataError, match=r"has shape \(1, 6, 6\) but the first image \(1, 8, 8\)"):
        image_tables(path=str(tmp_path / "imgs"))
    tables = image_tables(path=str(tmp_path / "imgs"), size=[4, 4], mode="RGB")
    assert tables["all"].batch(torch.arange(2))["input"].shape == (2, 3, 4, 4)
    from datasets import Dataset

    Dataset.from_dict({"image": [Image.new("L", (2, 2))], "label": [3]}).save_to_disk(
        str(tmp_path / "saved")
    )
    with pytest.raises(DataError, match="has no class names"):
        image_tables(path=str(tmp_path / "saved"))
