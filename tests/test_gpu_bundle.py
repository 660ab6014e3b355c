"""The bundle that carries the GPU check to a machine without a package index
(``benchmarks/gpu_bundle.py``): its Fashion-MNIST subset reads back as the first images of the
real files, and its stand-in models load through the ordinary loaders with the real shapes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import MINILM, needs_fashion_mnist

from potstill.data.images import FASHION_MNIST_DIR, load_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent


def _bundle():
    spec = importlib.util.spec_from_file_location(
        "gpu_bundle", ROOT / "benchmarks" / "gpu_bundle.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_fashion_mnist
def test_the_fashion_mnist_subset_is_the_first_images(tmp_path):
    bundle = _bundle()
    for f in FASHION_MNIST_DIR.glob("*-ubyte.gz"):
        bundle._truncate_idx(f, tmp_path / f.name, 300)
    (train, test), (full_train, full_test) = load_fashion_mnist(tmp_path), load_fashion_mnist()
    for small, full in ((train, full_train), (test, full_test)):
        assert len(small) == 300
        for a, b in zip(small.tensors, full.tensors, strict=True):
            assert torch.equal(a, b[:300])


@pytest.mark.skipif(MINILM is None, reason="all-MiniLM-L6-v2 not packaged here")
def test_a_stand_in_has_the_architecture_and_is_found_in_the_cache(tmp_path, monkeypatch):
    """A model folder without weights gets random ones of its architecture (marked as such),
    and :func:`potstill.assets.minilm_l6` finds a copy in ``POTSTILL_CACHE``."""
    from transformers import AutoModel

    from potstill import assets

    bundle = _bundle()
    monkeypatch.setattr(bundle, "BUNDLE", tmp_path)
    bundle._copy_without_weights(MINILM, tmp_path / "cache" / "all-MiniLM-L6-v2")
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    bundle.unpack()
    folder = tmp_path / "cache" / "all-MiniLM-L6-v2"
    assert (folder / bundle.STAND_IN).exists()
    real, stand_in = AutoModel.from_pretrained(MINILM), AutoModel.from_pretrained(folder)
    shapes = {k: v.shape for k, v in real.state_dict().items()}
    assert {k: v.shape for k, v in stand_in.state_dict().items()} == shapes
    assert not torch.equal(real.embeddings.word_embeddings.weight,
                           stand_in.embeddings.word_embeddings.weight)  # fmt: skip
    monkeypatch.setattr(assets, "_package_dir", lambda module: None)  # as on the GPU machine
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "cache"))
    assert assets.minilm_l6() == folder
