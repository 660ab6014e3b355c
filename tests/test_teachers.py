"""Tests for teacher sources: a classifier's logit cache (an ``example`` cache of
potstill.cache) against the live teacher, its fingerprints and checksums, rebuilding a stale
cache, and training with a cache versus live. Token caches are tested in test_cache.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_mlp, quiet_config, state_equal
from torch.utils.data import Dataset, TensorDataset

from potstill.cache import (
    CachedTeacher,
    CacheError,
    build_logit_cache,
    cached_or_live,
    data_fingerprint,
)
from potstill.config import OptimizerConfig
from potstill.data.splits import IGNORE_INDEX
from potstill.data.tensors import make_batch
from potstill.distiller import Distiller
from potstill.losses.terms import hinton_objective
from potstill.teachers import LiveTeacher, model_fingerprint


@pytest.fixture
def cache(digits, teacher_model, tmp_path) -> Path:
    return build_logit_cache(
        teacher_model, digits.train, tmp_path / "logits-cache", batch_size=500, progress=False
    )


def _shard(cache: Path) -> Path:
    (shard,) = (cache / "shards").glob("*.safetensors")  # a logit cache this small is one shard
    return shard


def test_cached_signal_equals_live_teacher(digits, teacher_model, cache):
    cached = CachedTeacher(cache, dataset=digits.train, teacher=teacher_model)
    live = LiveTeacher(teacher_model)
    assert len(cached) == len(digits.train)
    assert cached.meaning["num_examples"] == len(digits.train)
    assert cached.meaning["data"] == data_fingerprint(digits.train, "example")
    assert cached.meaning["teacher_weights"] == model_fingerprint(teacher_model)
    assert (cached.unit, cached.k) == ("example", None)
    order = torch.randperm(len(digits.train), generator=torch.Generator().manual_seed(0))
    for index in (order[:64], order[64:65], torch.tensor([len(digits.train) - 1, 0, 7, 7])):
        batch = make_batch(digits.train, index)
        got = cached.signal(batch).logits
        want = live.signal(batch).logits
        assert got.dtype == torch.float32
        assert got.shape == (len(index), 10)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_cache_of_another_dataset_is_refused(digits, cache):
    with pytest.raises(CacheError, match="num_examples differs"):
        CachedTeacher(cache, dataset=digits.val)
    # one changed pixel is another dataset
    x, y = digits.train.tensors
    x = x.clone()
    x[10, 0, 3, 3] += 1 / 16
    with pytest.raises(CacheError, match="data differs"):
        CachedTeacher(cache, dataset=TensorDataset(x, y))


def test_cache_of_another_teacher_is_refused(digits, teacher_model, cache):
    other = copy.deepcopy(teacher_model)
    with torch.no_grad():
        next(other.parameters())[0, 0] += 1e-3
    with pytest.raises(CacheError, match="teacher_weights differs"):
        CachedTeacher(cache, dataset=digits.train, teacher=other)
    CachedTeacher(cache, dataset=digits.train, teacher=copy.deepcopy(teacher_model))


def test_cache_accepts_the_same_inputs_with_other_labels(digits, cache):
    x, y = digits.train.tensors
    relabelled = y.clone()
    relabelled[::2] = IGNORE_INDEX
    CachedTeacher(cache, dataset=TensorDataset(x, relabelled))
    CachedTeacher(cache, dataset=TensorDataset(x.clone()))  # no labels at all


def test_damaged_logits_are_detected(digits, cache):
    shard = _shard(cache)
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0x10  # inside the logits
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=r"shard 0 \(shards/shard-000000.safetensors\) is damaged"):
        CachedTeacher(cache)


def test_truncated_or_foreign_cache_is_refused(tmp_path, cache):
    shard = _shard(cache)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheError, match="is damaged"):
        CachedTeacher(cache, verify=False)  # the size alone shows it
    with pytest.raises(CacheError, match="does not exist"):
        CachedTeacher(tmp_path / "missing")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "logits.safetensors").write_bytes(b"x")
    with pytest.raises(CacheError, match="not a potstill teacher cache"):
        CachedTeacher(foreign)


def test_cached_or_live_rebuilds_a_stale_or_damaged_cache(digits, teacher_model, cache):
    other = copy.deepcopy(teacher_model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    source = cached_or_live(other, digits.train, cache)
    assert isinstance(source, CachedTeacher)
    assert source.meaning["teacher_weights"] == model_fingerprint(other)
    batch = make_batch(digits.train, torch.arange(50))
    torch.testing.assert_close(
        source.signal(batch).logits, LiveTeacher(other).signal(batch).logits, atol=1e-6, rtol=0
    )

    # damage it: rebuilt again, for the teacher asked for
    _shard(cache).write_bytes(_shard(cache).read_bytes()[:200])
    source = cached_or_live(teacher_model, digits.train, cache)
    assert source.meaning["teacher_weights"] == model_fingerprint(teacher_model)
    CachedTeacher(cache, dataset=digits.train, teacher=teacher_model)


def test_cached_or_live_reuses_a_matching_cache(digits, teacher_model, cache):
    before = _shard(cache).stat().st_mtime_ns
    source = cached_or_live(teacher_model, digits.train, cache)
    assert isinstance(source, CachedTeacher)
    assert _shard(cache).stat().st_mtime_ns == before
    assert isinstance(cached_or_live(teacher_model, digits.train, None), LiveTeacher)


def test_model_fingerprint_sees_every_weight_and_only_weights(teacher_model):
    base = model_fingerprint(teacher_model)
    same = copy.deepcopy(teacher_model).train()
    assert model_fingerprint(same) == base
    for name in same.state_dict():
        changed = copy.deepcopy(teacher_model)
        with torch.no_grad():
            changed.state_dict()[name].view(-1)[-1] += 1.0
        assert model_fingerprint(changed) != base, name


class _ItemDataset(Dataset):
    """The same examples as a TensorDataset, served one by one."""

    def __init__(self, ds: TensorDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_cache_of_a_generic_dataset_matches_live(digits, teacher_model, tmp_path):
    x, y = digits.val.tensors
    ds = _ItemDataset(digits.val)
    path = build_logit_cache(teacher_model, ds, tmp_path / "c", batch_size=100)
    cached = CachedTeacher(path, dataset=ds, teacher=teacher_model)
    with torch.no_grad():
        want = teacher_model.eval()(x)
    got = cached.signal({"index": torch.arange(len(ds))}).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_training_with_the_cache_equals_training_live(digits, teacher_model, cache):
    def run(source):
        cfg = quiet_config(
            epochs=2, batch_size=64, seed=3, log_every=5, optimizer=OptimizerConfig(lr=5e-3)
        )
        return Distiller(
            make_mlp([16], seed=4),
            hinton_objective(4.0, 0.7),
            digits.train,
            teacher=source,
            config=cfg,
        ).fit()

    live = run(LiveTeacher(teacher_model))
    cached = run(CachedTeacher(cache, dataset=digits.train, teacher=teacher_model))
    assert live.steps == cached.steps == 2 * 18
    assert not state_equal(live.student, make_mlp([16], seed=4))
    for (name, a), (_, b) in zip(
        live.student.state_dict().items(), cached.student.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    for ra, rb in zip(live.history, cached.history, strict=True):
        assert ra["kd"] == pytest.approx(rb["kd"], rel=1e-4)
