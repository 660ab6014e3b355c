"""Filling a teacher cache: the teacher runs once over a dataset and its rows go to checksummed
shards, written atomically and recorded per part, so several processes or machines fill one
cache and an interrupted writer continues where it stopped; a classic run's private logit cache."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed, faults
from .._version import __version__
from ..data.tensors import make_batch
from ..guards import check_teacher_rows
from ..io import atomic_create_text, atomic_save_safetensors, atomic_write_text, sha256_file
from ..locks import Lock
from ..placement import CPU
from ..progress import Progress
from ..taps import TapsLike
from ..teachers import ForwardFn, LiveTeacher, default_forward, freeze
from .codec import Encoding, compress_rows, encode_topk, id_dtype, narrow_topk, topk_rows
from .format import (
    CacheError,
    CacheStatus,
    Unit,
    cache_id,
    cache_meaning,
    cache_status,
    compare_meaning,
    expected_config,
    part_file,
    read_json,
    read_manifest,
    shard_name,
    shard_records,
)
from .reader import CachedTeacher

if TYPE_CHECKING:
    from ..served import ServedTeacher

log = logging.getLogger("potstill")

SHARD_TARGET_BYTES = 64 << 20
"""Default shard size: about this many bytes of rows (estimated before the first batch)."""


def _default_shard_size(n: int, row_bytes: int, rows_per_example: int) -> int:
    per_example = max(1, row_bytes * rows_per_example)
    return max(1, min(n, SHARD_TARGET_BYTES // per_example))


def _row_bytes(k: int | None, vocab: int, encoding: Encoding) -> int:
    if k is None:
        return vocab * (4 if encoding.logits == "float32" else 2)
    value = {"float32": 4, "float16": 2, "q8": 1}[encoding.logprobs]
    return k * (id_dtype(vocab).itemsize + value) + 4


def _open_manifest(path: Path, meaning: dict[str, Any], shard_size: int | None, row_bytes: int,
                   rows_per_example: int, teacher_name: str | None) -> dict[str, Any]:  # fmt: skip
    """The cache's manifest, checked against ``meaning``; created first when there is none.

    Several parts may start on an empty folder at once: the manifest is created only if absent
    (atomically), and a part that loses the race checks the winner's like any other."""
    file = path / "manifest.json"
    if not file.exists():
        foreign = [
            p.name
            for p in (path.iterdir() if path.exists() else [])
            if p.name not in ("parts", "shards") and not p.name.startswith(".manifest.json.")
        ]
        if foreign:
            raise CacheError(
                f"{path} exists and is not a teacher cache (it holds {sorted(foreign)[:3]}); "
                "choose an empty or new folder"
            )
        n = meaning["num_examples"]
        size = shard_size or _default_shard_size(n, row_bytes, rows_per_example)
        manifest = {
            "meaning": meaning,
            "cache_id": cache_id(meaning),
            "shard_size": size,
            "num_shards": math.ceil(n / size),
            "teacher_name": teacher_name,
            "potstill_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if atomic_create_text(file, json.dumps(manifest, indent=1)):
            return manifest
    manifest = read_manifest(path)
    compare_meaning(path, manifest["meaning"], meaning)
    if shard_size is not None and shard_size != manifest["shard_size"]:
        raise CacheError(
            f"teacher cache {path}: shard_size differs (cache {manifest['shard_size']}, now "
            f"{shard_size}); leave it out to continue this cache"
        )
    return manifest


def _rows_of(tensor: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Per example: its row tensor (the real positions of a token batch, or the one row)."""
    if mask is None:
        return [t.unsqueeze(0) for t in tensor]
    if tensor.shape[:2] != mask.shape:
        raise ValueError(
            f"a token cache needs (B, T, …) outputs matching the attention mask "
            f"{tuple(mask.shape)}, got {tuple(tensor.shape)}"
        )
    return [t[m] for t, m in zip(tensor, mask.bool(), strict=True)]


def write_cache(
    teacher: nn.Module | ServedTeacher,
    dataset: Dataset,
    path: str | os.PathLike,
    *,
    unit: Unit = "example",
    k: int | None = None,
    encoding: Encoding | None = None,
    forward: ForwardFn = default_forward,
    taps: TapsLike | None = None,
    tokenizer: Any = None,
    shard_size: int | None = None,
    batch_size: int = 8,
    part: tuple[int, int] = (0, 1),
    teacher_name: str | None = None,
    progress: bool | None = None,
    vocab_size: int | None = None,
) -> CacheStatus:
    """Run a frozen teacher over ``dataset`` once and write its signal to the cache at ``path``.

    ``unit="example"`` stores one row per example (``forward`` gives ``(B, V)``); ``"token"``
    one row per real token (``forward`` gives ``(B, T, V)``; batches carry ``attention_mask``).
    ``k`` None stores dense logits, an int the top-k form (see the module doc and
    :class:`Encoding`). ``taps`` (name → module path) adds those modules' outputs, stored per
    row too. ``part=(i, N)`` writes only shards ``j`` with ``j % N == i``, so N processes or
    machines fill one cache together. Shards already recorded (by any part) are skipped, so an
    interrupted call is continued by calling it again. Returns the cache's status.

    ``teacher`` may be a :class:`~potstill.served.ServedTeacher`: its top-k rows are stored
    (token caches, ``k`` at most its ``top_k``, the mass of entries beyond ``k`` added to the
    tail), ``vocab_size`` (the teacher config's) is required, and the manifest records the
    server's :meth:`~potstill.served.ServedTeacher.fingerprint` in place of the weights'.
    """
    path = Path(path)
    encoding = encoding or Encoding()
    i_part, n_parts = part
    if not (n_parts >= 1 and 0 <= i_part < n_parts):
        raise ValueError(f"part must be (i, N) with 0 ≤ i < N, got {part}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the dataset is empty: nothing to cache")
    with ExitStack() as stack:
        if isinstance(teacher, nn.Module):
            freeze(teacher)
            source: LiveTeacher | ServedTeacher = LiveTeacher(teacher, forward=forward, taps=taps)
            stack.callback(source.close)
            probe = CPU.signal(source.signal(make_batch(dataset, torch.arange(min(2, n)))))
            assert probe.logits is not None
            vocab, features = probe.logits.shape[-1], sorted(probe.features)
            who: nn.Module | str = teacher
        else:  # served: the caller owns (and closes) it
            vocab, features = _served_checks(teacher, unit, k, taps, vocab_size)
            source, who = teacher, teacher.fingerprint()
        if k is not None and not 1 <= k <= vocab:
            raise ValueError(f"k must lie in [1, V={vocab}], got {k}")
        meaning = cache_meaning(
            who, dataset, unit=unit, k=k, vocab_size=vocab, encoding=encoding,
            tokenizer=tokenizer, features=features,
        )  # fmt: skip
        continued = (path / "manifest.json").exists()
        if continued and isinstance(teacher, nn.Module):  # as its config fingerprint was made
            meaning["teacher_config"] = expected_config(read_manifest(path)["meaning"], teacher)
        length = meaning["max_length"] or 1
        manifest = _open_manifest(
            path, meaning, shard_size, _row_bytes(k, vocab, encoding), length, teacher_name
        )
        mine = [j for j in range(manifest["num_shards"]) if j % n_parts == i_part]
        record_file = part_file(path, part)
        lock = Lock(
            record_file.with_suffix(".lock"), f"teacher cache {path}, part {i_part}/{n_parts}",
            "wait for it to finish, or give this process another --shard",
            by="another cache writer", error=CacheError,
        )  # fmt: skip
        stack.callback(lock.release)
        record = (
            read_json(record_file, "teacher cache part record")
            if record_file.exists()
            else {"cache_id": manifest["cache_id"], "part": i_part, "parts": n_parts, "shards": {}}
        )
        done = shard_records(path, manifest)
        for j in list(record["shards"]):
            if not _shard_ok(path, record["shards"][j]):
                log.warning("teacher cache %s: shard %s is damaged; rewriting it", path, j)
                del record["shards"][j]
                done.pop(int(j), None)
        todo = [j for j in mine if j not in done]
        size = manifest["shard_size"]
        total = sum(min(size, n - j * size) for j in todo)
        bar = Progress(total, f"teacher cache {i_part}/{n_parts}", "ex", enabled=progress)
        t0, tokens = time.perf_counter(), 0
        for j in todo:
            lo, hi = j * size, min(n, (j + 1) * size)
            tensors = _shard_tensors(
                source, dataset, range(lo, hi), unit, k, vocab, encoding, batch_size, bar
            )
            tokens += int(tensors["offsets"][-1])
            file = path / shard_name(j)
            meta = {"cache_id": manifest["cache_id"], "shard": str(j), "examples": f"{lo}:{hi}"}
            atomic_save_safetensors(tensors, file, metadata=meta)
            faults.point("cache")
            record["shards"][str(j)] = {
                "file": shard_name(j),
                "examples": [lo, hi],
                "positions": int(tensors["offsets"][-1]),
                "bytes": file.stat().st_size,
                "sha256": sha256_file(file),
                "host": socket.gethostname(),
            }
            record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            atomic_write_text(record_file, json.dumps(record, indent=1))
            bar.set_postfix({"tok/s": f"{tokens / (time.perf_counter() - t0):,.0f}"})
        bar.close()
    status = cache_status(path)
    if status.complete:
        log.info(
            "teacher cache %s complete: %d examples, %d rows, %.1f MB (%.1f bytes per row)",
            path, status.num_examples, status.positions, status.bytes / 1e6,
            status.bytes / max(1, status.positions),
        )  # fmt: skip
    else:
        log.info(
            "teacher cache %s: %d of %d shards written; waiting for the other parts",
            path, len(status.done), status.num_shards,
        )  # fmt: skip
    return status


def _served_checks(
    teacher: ServedTeacher, unit: Unit, k: int | None, taps: TapsLike | None,
    vocab_size: int | None,
) -> tuple[int, list[str]]:  # fmt: skip
    """A served teacher's vocabulary and (no) features, or what it cannot give."""
    if unit != "token" or k is None or taps:
        needs = "rows per example" if unit != "token" else "dense logits" if k is None else "taps"
        raise ValueError(
            f"a served teacher gives top-k rows per token; a cache of {needs} needs a local one"
        )
    if k > teacher.k:
        raise ValueError(
            f"teacher.cache.k = {k} is more than the server is asked for "
            f"(teacher.server.top_k = {teacher.k}); lower the cache's k, or raise top_k (and "
            "the server's --max-logprobs)"
        )
    if vocab_size is None:
        raise ValueError("a cache filled from a served teacher needs vocab_size (its config's)")
    return int(vocab_size), []


def _shard_ok(path: Path, record: Mapping[str, Any]) -> bool:
    file = path / record["file"]
    return (
        file.exists()
        and file.stat().st_size == record["bytes"]
        and sha256_file(file) == record["sha256"]
    )


@torch.no_grad()
def _shard_tensors(
    source: LiveTeacher | ServedTeacher,
    dataset: Dataset,
    examples: range,
    unit: Unit,
    k: int | None,
    vocab: int,
    encoding: Encoding,
    batch_size: int,
    bar: Progress,
) -> dict[str, torch.Tensor]:
    """The tensors of one shard: rows of ``examples`` in order, ``offsets`` (rows per example,
    cumulated), and for compressed top-k rows one ``blob`` with ``blob_offsets`` (one deflated
    block per ``encoding.block`` examples). A served source is asked for the next batch while
    this one is encoded."""
    columns: dict[str, list[torch.Tensor]] = {}
    blobs: list[bytes] = []
    pending: list[dict[str, torch.Tensor]] = []  # top-k rows of the block being filled
    counts: list[int] = []

    def flush() -> None:
        if pending:
            blobs.append(compress_rows({n: torch.cat([p[n] for p in pending]) for n in pending[0]}))
            pending.clear()

    index = torch.arange(examples.start, examples.stop)
    starts = range(0, len(index), batch_size)
    batches = (make_batch(dataset, index[lo : lo + batch_size]) for lo in starts)
    prefetch = getattr(source, "prefetch", None)
    batch = next(batches)
    while batch is not None:
        following = next(batches, None)
        if prefetch is not None and following is not None:
            prefetch(following)
        signal = CPU.signal(source.signal(batch))  # stored from the CPU, wherever it runs
        mask = batch["attention_mask"] if unit == "token" else None
        feature_rows = {name: _rows_of(t, mask) for name, t in signal.features.items()}
        if signal.topk is not None:  # served: its top-k, narrowed to this cache's k
            t = signal.topk
            topk = list(zip(*(_rows_of(x, mask) for x in (t.ids, t.logprobs, t.tail_mass)),
                            strict=True))  # fmt: skip
            logprob_rows = [lp for _, lp, _ in topk]
            check_teacher_rows(logprob_rows, batch["index"], "filling the teacher cache")
            row_counts = [len(ids) for ids, _, _ in topk]
        else:
            assert signal.logits is not None
            logit_rows = _rows_of(signal.logits, mask)
            for rows in (logit_rows, *feature_rows.values()):  # NaN is never cached
                check_teacher_rows(rows, batch["index"], "filling the teacher cache")
            row_counts = [len(rows) for rows in logit_rows]
        for e, count in enumerate(row_counts):
            counts.append(count)
            if k is None:
                stored = {"logits": logit_rows[e].to(getattr(torch, encoding.logits))}
            else:
                if signal.topk is not None:
                    stored = encode_topk(*narrow_topk(*topk[e], k), vocab, encoding)
                else:
                    stored = topk_rows(logit_rows[e], k, vocab, encoding)
                if encoding.compression == "zlib":
                    pending.append(stored)
                    stored = {}
                    if len(pending) == encoding.block:
                        flush()
            for name, feats in feature_rows.items():
                stored[f"feature.{name}"] = feats[e].to(getattr(torch, encoding.features))
            for name, tensor in stored.items():
                columns.setdefault(name, []).append(tensor.contiguous())
        bar.update(len(batch["index"]))
        batch = following
    flush()
    tensors = {name: torch.cat(parts) for name, parts in columns.items()}
    tensors["offsets"] = torch.tensor([0, *np.cumsum(counts)], dtype=torch.int64)
    if blobs:
        sizes = [len(b) for b in blobs]
        tensors["blob"] = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        tensors["blob_offsets"] = torch.tensor([0, *np.cumsum(sizes)], dtype=torch.int64)
    return tensors


# ---- classic (example) caches -------------------------------------------------------------------


def build_logit_cache(
    teacher: nn.Module,
    dataset: Dataset,
    path: str | os.PathLike,
    *,
    forward: ForwardFn = default_forward,
    batch_size: int = 1024,
    progress: bool | None = None,
    part: tuple[int, int] = (0, 1),
) -> Path:
    """Cache a classifier teacher's dense float32 logits on ``dataset`` at ``path`` (an
    ``example`` cache: :func:`write_cache` with ``k=None``; ``part`` as there); returns the
    path."""
    write_cache(
        teacher,
        dataset,
        path,
        unit="example",
        k=None,
        encoding=Encoding(logits="float32", compression="none"),  # random access: no inflating
        forward=forward,
        batch_size=batch_size,
        progress=progress,
        part=part,
    )
    return Path(path)


def cached_or_live(
    teacher: nn.Module,
    dataset: Dataset,
    path: str | os.PathLike | None,
    forward: ForwardFn = default_forward,
) -> LiveTeacher | CachedTeacher:
    """A CachedTeacher of ``teacher``'s logits on ``dataset`` at ``path`` (built when missing,
    rebuilt when it does not match or is damaged: this is a run's private cache), or a
    LiveTeacher when ``path`` is None."""
    if path is None:
        return LiveTeacher(teacher, forward)
    path = Path(path)
    rank, world = distributed.setup()
    cached, error = None, None
    if path.exists():
        try:
            cached = CachedTeacher(path, dataset=dataset, teacher=teacher)
        except CacheError as e:
            error = e
    distributed.barrier()  # every process has looked before any of them writes
    if cached is not None:
        return cached
    if error is not None:
        log.warning("%s; rebuilding it", error)
        if rank == 0:
            _remove_cache(path)
        distributed.barrier()
    # under torchrun each process fills its part of the shards
    build_logit_cache(teacher, dataset, path, forward=forward, part=(rank, world))
    distributed.barrier()
    return CachedTeacher(path, verify=False)


def _remove_cache(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
