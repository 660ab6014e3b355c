"""Reading a teacher cache: :class:`CachedTeacher` checks the manifest against what it is used
with, verifies the shards, and serves each batch's :class:`~potstill.signal.Signal` from
memory-mapped shards, example by example (dense example caches in one gather)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import Dataset

from ..data.tensors import TensorDictDataset, token_width
from ..io import sha256_file
from ..progress import Progress
from ..signal import Signal, TopK, place_rows
from ..teachers import Batch, model_fingerprint
from .codec import Encoding, decode_topk, decompress_rows, id_dtype
from .format import (
    CacheError,
    Unit,
    compare_meaning,
    data_fingerprint,
    expected_config,
    read_manifest,
    shard_records,
    tokenizer_fingerprint,
)

# ---- reading -----------------------------------------------------------------------------------


class CachedTeacher:
    """A teacher read from a cache written by :func:`write_cache` (``potstill cache``).

    Shards are memory-mapped and read example by example: ``cached[i]`` gives example ``i``'s
    rows, :meth:`signal` a batch's :class:`~potstill.signal.Signal` (batches carry ``"index"``,
    or ``"cache_index"`` when they come from a subset, and token batches their
    ``attention_mask``). It pickles without its open files, so DataLoader workers each open
    their own.

    Checks on opening: the manifest against ``expect`` (fields from :func:`cache_meaning`) and
    against ``teacher`` / ``dataset`` / ``tokenizer`` when given, naming the first field that
    differs; that every shard is written (unless ``allow_incomplete``: then :attr:`available`
    says which examples are there); every shard's size, and its SHA-256 unless ``verify=False``.

    >>> cached = CachedTeacher("runs/x/teacher-cache", dataset=train)  # doctest: +SKIP
    >>> cached.signal(train.batch(torch.tensor([0, 5]))).topk.ids.shape  # doctest: +SKIP
    torch.Size([2, 61, 64])
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        expect: Mapping[str, Any] | None = None,
        teacher: nn.Module | None = None,
        dataset: Dataset | None = None,
        tokenizer: Any = None,
        allow_incomplete: bool = False,
        verify: bool = True,
        progress: bool | None = None,
    ) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.manifest = manifest
        self.meaning: dict[str, Any] = manifest["meaning"]
        expected = dict(expect or {})
        if teacher is not None:
            expected["teacher_weights"] = model_fingerprint(teacher)
            expected["teacher_config"] = expected_config(self.meaning, teacher)
        if tokenizer is not None:
            expected["tokenizer"] = tokenizer_fingerprint(tokenizer)
        if dataset is not None:
            if self.meaning["unit"] == "token" and token_width(dataset) is not None:
                expected["max_length"] = token_width(dataset)
            expected["num_examples"] = len(dataset)  # type: ignore[arg-type]
            expected["data"] = data_fingerprint(dataset, self.meaning["unit"])
        compare_meaning(self.path, self.meaning, expected)
        self.encoding = Encoding(**self.meaning["encoding"])
        self.records = shard_records(self.path, manifest)
        missing = [j for j in range(manifest["num_shards"]) if j not in self.records]
        if missing and not allow_incomplete:
            raise CacheError(
                f"teacher cache {self.path} is incomplete: {len(self.records)} of "
                f"{manifest['num_shards']} shards written (missing {ranges(missing)}). Finish "
                "it by rerunning `potstill cache` (with the same --shard i/N for each part), or "
                "use what is there (allow_incomplete / --allow-incomplete)."
            )
        self._check_files(verify, progress)
        size, n = manifest["shard_size"], self.meaning["num_examples"]
        self.available = torch.zeros(n, dtype=torch.bool)
        for j in self.records:
            self.available[j * size : (j + 1) * size] = True
        self._open: dict[int, tuple[Any, torch.Tensor, torch.Tensor | None]] = {}
        self._blocks: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._dense: dict[int, dict[str, torch.Tensor] | None] = {}

    def _check_files(self, verify: bool, progress: bool | None) -> None:
        items = sorted(self.records.items())
        bar = Progress(
            len(items), "verifying teacher cache", "shard", enabled=progress, show=verify
        )
        for j, record in items:
            bar.update(1)
            file = self.path / record["file"]
            if not file.exists():
                raise CacheError(
                    f"teacher cache {self.path}: shard {j} ({record['file']}) is missing; rerun "
                    "`potstill cache` to rewrite it"
                )
            if file.stat().st_size != record["bytes"] or (
                verify and sha256_file(file) != record["sha256"]
            ):
                raise CacheError(
                    f"teacher cache {self.path}: shard {j} ({record['file']}) is damaged (its "
                    "checksum differs from the record); rerun `potstill cache` to rewrite it"
                )
        bar.close()

    # -- pickling for DataLoader workers: open files stay behind
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}
        state["_blocks"] = {}
        state["_dense"] = {}
        return state

    def __len__(self) -> int:
        return int(self.meaning["num_examples"])

    @property
    def unit(self) -> Unit:
        """``token`` (rows per real token) or ``example`` (one row per example)."""
        return self.meaning["unit"]

    @property
    def k(self) -> int | None:
        """Top-k width, or None for dense logits."""
        return self.meaning["k"]

    @property
    def feature_names(self) -> set[str]:
        """Names of the tapped features this cache holds."""
        return set(self.meaning["features"])

    def _shard(self, j: int) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        if j not in self._open:
            if j not in self.records:
                raise CacheError(
                    f"teacher cache {self.path}: shard {j} is not written (incomplete cache); "
                    "train only on cached.available examples"
                )
            file = self.path / self.records[j]["file"]
            f = safe_open(str(file), framework="pt")
            meta = f.metadata() or {}
            if meta.get("cache_id") != self.manifest["cache_id"] or meta.get("shard") != str(j):
                raise CacheError(f"{file} is not shard {j} of teacher cache {self.path}")
            blob_offsets = f.get_tensor("blob_offsets") if "blob_offsets" in f.keys() else None
            self._open[j] = (f, f.get_tensor("offsets"), blob_offsets)
        return self._open[j]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Example ``i``'s stored rows, decoded: ``logits`` ``(rows, V)``, or ``ids``,
        ``logprobs`` ``(rows, k)`` and ``tail`` ``(rows,)``; plus ``feature.<name>``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} is outside the cache's {n} examples")
        i %= n
        size = self.manifest["shard_size"]
        j, local = divmod(i, size)
        f, offsets, blob_offsets = self._shard(j)
        a, b = int(offsets[local]), int(offsets[local + 1])
        out: dict[str, torch.Tensor] = {}
        if self.k is None:
            out["logits"] = f.get_slice("logits")[a:b].float()
        elif blob_offsets is not None:
            g = local // self.encoding.block
            first = int(offsets[g * self.encoding.block])
            block = self._block(j, g, f, offsets, blob_offsets)
            out.update({name: t[a - first : b - first].clone() for name, t in block.items()})
        else:
            rows = {name: f.get_slice(name)[a:b] for name in self._dtypes()}
            topk = decode_topk(rows, self.encoding)
            out.update(ids=topk.ids, logprobs=topk.logprobs, tail=topk.tail_mass)
        for name in self.meaning["features"]:
            out[f"feature.{name}"] = f.get_slice(f"feature.{name}")[a:b].float()
        return out

    def _block(
        self, j: int, g: int, f: Any, offsets: torch.Tensor, blob_offsets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The decoded rows of compressed block ``g`` of shard ``j``; the last few blocks read
        are kept, so neighbouring examples do not inflate their block again."""
        key = (j, g)
        if key in self._blocks:
            self._blocks[key] = self._blocks.pop(key)  # most recent last
            return self._blocks[key]
        x, y = int(blob_offsets[g]), int(blob_offsets[g + 1])
        block = self.encoding.block
        last = min(len(offsets) - 1, (g + 1) * block)
        n_rows = int(offsets[last]) - int(offsets[g * block])
        raw = decompress_rows(
            f.get_slice("blob")[x:y].numpy().tobytes(), n_rows, self.k, self._dtypes()
        )
        topk = decode_topk(raw, self.encoding)
        decoded = {"ids": topk.ids, "logprobs": topk.logprobs, "tail": topk.tail_mass}
        self._blocks[key] = decoded
        while len(self._blocks) > 8:
            self._blocks.pop(next(iter(self._blocks)))
        return decoded

    def _dtypes(self) -> dict[str, torch.dtype]:
        e = self.encoding
        d = {
            "ids": id_dtype(self.meaning["vocab_size"]),
            "logprobs": torch.uint8 if e.logprobs == "q8" else getattr(torch, e.logprobs),
            "tail": torch.float16 if e.lossy else torch.float32,
        }
        if e.logprobs == "q8":
            d["top"] = torch.float16
        return d

    def collate(
        self, items: Sequence[Mapping[str, torch.Tensor]], attention_mask: torch.Tensor | None
    ) -> Signal:
        """Examples' rows (from ``cached[i]``) as one batch Signal: stacked for an example
        cache; for a token cache placed at the real positions of ``attention_mask`` ``(B, T)``,
        padding positions holding a uniform top-k (or zero logits) that masks leave out."""
        if self.unit == "example":
            stacked = {name: torch.cat([it[name] for it in items]) for name in items[0]}
        else:
            if attention_mask is None:
                raise ValueError("a token cache needs the batch's attention_mask")
            stacked = _place(items, attention_mask.bool(), self.path)
        features = {
            name[len("feature.") :]: t for name, t in stacked.items() if name.startswith("feature.")
        }
        if self.k is None:
            return Signal(logits=stacked["logits"], features=features)
        topk = TopK(ids=stacked["ids"], logprobs=stacked["logprobs"], tail_mass=stacked["tail"])
        return Signal(topk=topk, features=features)

    def _dense_rows(self, j: int) -> dict[str, torch.Tensor] | None:
        """An example cache's dense shard ``j`` as whole tensors (one row per example), read
        once and kept: a batch is then one gather, not a Python call per example. None when
        the shard's rows are not one per example."""
        if j not in self._dense:
            f, offsets, _ = self._shard(j)
            one_each = torch.equal(offsets, torch.arange(len(offsets), dtype=offsets.dtype))
            names = ["logits"] + [f"feature.{n}" for n in self.meaning["features"]]
            self._dense[j] = {name: f.get_tensor(name) for name in names} if one_each else None
        return self._dense[j]

    def _gather_examples(self, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Rows of a dense example cache for ``index``, gathered shard by shard (float32)."""
        n, size = len(self), self.manifest["shard_size"]
        if len(index) == 0 or int(index.min()) < 0 or int(index.max()) >= n:
            return None  # the per-example path names the bad index
        shards, local = index // size, index % size
        out: dict[str, torch.Tensor] = {}
        for j in shards.unique().tolist():
            rows = self._dense_rows(j)
            if rows is None:
                return None
            sel = (shards == j).nonzero().flatten()
            for name, t in rows.items():
                if name not in out:
                    out[name] = torch.empty((len(index), *t.shape[1:]), dtype=torch.float32)
                out[name][sel] = t[local[sel]].float()
        return out

    def signal(self, batch: Batch) -> Signal:
        """The cached signal of the batch's examples (``cache_index`` or ``index``)."""
        # the cache lives on the CPU: it is read there, with the batch's ids and mask brought
        # back from the student's device; the loop moves the signal to the student
        index = torch.as_tensor(batch.get("cache_index", batch["index"]), dtype=torch.long).cpu()
        if self.unit == "example" and self.k is None:
            rows = self._gather_examples(index)
            if rows is not None:
                return self.collate([rows], None)
        items = [self[int(i)] for i in index]
        mask = batch.get("attention_mask") if self.unit == "token" else None
        return self.collate(items, None if mask is None else mask.cpu())

    def subset(self, dataset: Dataset) -> Dataset:
        """The examples of ``dataset`` (the one cached) that this cache holds, each carrying
        its ``cache_index``: what to train on from an incomplete cache."""
        keep = self.available.nonzero().flatten()
        if not isinstance(dataset, TensorDictDataset):  # a token table: no row is read
            return dataset.select(keep, cache_index=keep)  # type: ignore[attr-defined]
        tensors = {name: t[keep] for name, t in dataset.tensors.items()}
        tensors["cache_index"] = keep
        return TensorDictDataset(tensors, trim_by=dataset.trim_by)


def _place(
    items: Sequence[Mapping[str, torch.Tensor]], mask: torch.Tensor, path: Path
) -> dict[str, torch.Tensor]:
    counts = mask.sum(1).tolist()
    for b, item in enumerate(items):
        rows = next(iter(item.values())).shape[0]
        if rows != counts[b]:
            raise CacheError(
                f"teacher cache {path}: batch row {b} has {counts[b]} real tokens but the cache "
                f"holds {rows} for that example: the data differs from the cached data"
            )
    return place_rows(items, mask)


def ranges(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0–2, 5"``."""
    spans: list[list[int]] = []
    for v in sorted(values):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in spans)
