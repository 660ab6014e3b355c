"""Teacher-signal caches on disk: the teacher runs once over a dataset and its Signal (dense
logits, or top-k log-probabilities with the tail mass, and tapped features) goes to checksummed,
sharded safetensors files that several machines can fill together and training reads back
memory-mapped, example by example.

Layout of a cache folder::

    manifest.json                      what the cache means: teacher, tokenizer, data, k, …
    parts/part-00000-of-00004.json     the shards one writer finished, with their checksums
    shards/shard-000000.safetensors    rows of examples [0, shard_size), and so on

Rows: an ``example`` cache keeps one row per example (a classifier's logits); a ``token`` cache
keeps one row per real token (``attention_mask`` 1) of each example, the teacher's next-token
distribution at that position. A row is either ``V`` dense logits (``k`` None) or the top-k:
token ids (uint16 when V ≤ 65,536), log-probabilities (``float32``, ``float16`` or ``q8``: one
byte, steps of 1/16 nat below the row's largest log-probability, kept in float16) and the tail
mass (the probability of all other tokens). With ``compression: zlib`` the top-k rows of a few
consecutive examples (``Encoding.block``) are deflated together, each row's entries sorted by
token id, the ids as gaps, bytes shuffled; a reader inflates only the blocks a batch needs.

Safety: a shard is written to a temporary file, synced and renamed, and only then recorded (with
its SHA-256) in its part's record, itself replaced atomically; a shard that is not recorded does
not exist for readers, so killing a writer at any moment leaves nothing that reads as valid but
is not. A rerun skips recorded shards. Readers check the manifest against what they are used
with and name the first field that differs, verify every shard's checksum, and refuse an
incomplete cache unless told to use what is there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import distributed
from ._version import __version__
from .data import TensorDictDataset, fingerprint, make_batch
from .io import atomic_create_text, atomic_save_safetensors, atomic_write_text, sha256_file
from .signal import Signal, TopK
from .taps import TapsLike
from .teachers import Batch, ForwardFn, LiveTeacher, default_forward, freeze, model_fingerprint

log = logging.getLogger("potstill")

FORMAT = "potstill.teacher-cache.v2"
Q8_STEP = 1.0 / 16.0
"""Width of one ``q8`` step in nats: 255 steps reach 15.9 nats below a row's top log-prob."""
SHARD_TARGET_BYTES = 64 << 20
"""Default shard size: about this many bytes of rows (estimated before the first batch)."""

Unit = Literal["token", "example"]

# fields a reader compares, in the order they are checked (the first that differs is named)
CHECKED_FIELDS = (
    "format",
    "unit",
    "teacher_weights",
    "teacher_config",
    "tokenizer",
    "max_length",
    "num_examples",
    "data",
    "vocab_size",
    "k",
    "encoding",
    "features",
)


_WHAT = {
    "format": "cache format",
    "unit": "unit (token or example rows)",
    "teacher_weights": "teacher (its weights)",
    "teacher_config": "teacher (its config)",
    "tokenizer": "tokenizer",
    "max_length": "sequence length",
    "num_examples": "dataset (its size)",
    "data": "dataset (its content)",
    "vocab_size": "vocabulary size",
    "k": "top-k width",
    "encoding": "encoding",
    "features": "set of tapped features",
}


class CacheError(ValueError):
    """A teacher cache is damaged, incomplete, or does not match what it is used with."""


@dataclass(frozen=True)
class Encoding:
    """How rows are stored. ``logprobs``: top-k log-probabilities as ``float32`` (exact),
    ``float16`` or ``q8`` (one byte each, see the module doc); ``logits``: dense logits as
    ``float32`` or ``float16``; ``features``: tapped features; ``compression``: ``zlib`` deflates
    the top-k rows of ``block`` consecutive examples together (ids gap-coded), ``none`` keeps
    them fixed-width."""

    logprobs: Literal["float32", "float16", "q8"] = "q8"
    logits: Literal["float32", "float16"] = "float32"
    features: Literal["float32", "float16"] = "float16"
    compression: Literal["none", "zlib"] = "zlib"
    block: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.block, int) and self.block >= 1):
            raise ValueError(f"encoding.block must be a positive int, got {self.block!r}")
        allowed = {
            "logprobs": ("float32", "float16", "q8"),
            "logits": ("float32", "float16"),
            "features": ("float32", "float16"),
            "compression": ("none", "zlib"),
        }
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise ValueError(
                    f"encoding.{name} must be one of {options}, got {getattr(self, name)!r}"
                )

    @property
    def lossy(self) -> bool:
        """Whether stored top-k log-probabilities are rounded (then renormalised on read)."""
        return self.logprobs != "float32"


# ---- what a cache means ------------------------------------------------------------------------


def config_fingerprint(model: nn.Module) -> str | None:
    """SHA-256 of a Hugging Face model's config (JSON, sorted keys), None for plain modules."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    d = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version",)}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """SHA-256 of what decides a tokenizer's ids: its vocabulary and rules (the fast
    tokenizer's JSON when there is one), special tokens and chat template."""
    if tokenizer is None:
        return None
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def data_fingerprint(dataset: Dataset, unit: Unit) -> str:
    """Content fingerprint of what the teacher reads: a token dataset's ``input_ids`` and
    ``attention_mask``, or any dataset's inputs (labels left out)."""
    if isinstance(dataset, TensorDictDataset):
        keys = ("input_ids", "attention_mask") if unit == "token" else None
        tensors = {
            k: v
            for k, v in dataset.tensors.items()
            if (k in keys if keys else k not in ("label", "prompt_length"))
        }
        return fingerprint(TensorDictDataset(tensors))
    return fingerprint(dataset, inputs_only=True)


def cache_meaning(
    teacher: nn.Module,
    dataset: Dataset,
    *,
    unit: Unit,
    k: int | None,
    vocab_size: int,
    encoding: Encoding,
    tokenizer: Any = None,
    features: Sequence[str] = (),
) -> dict[str, Any]:
    """The manifest fields that pin what a cache built from these inputs means."""
    max_length = None
    if unit == "token":
        if not isinstance(dataset, TensorDictDataset) or "attention_mask" not in dataset.tensors:
            raise ValueError("a token cache needs a TensorDictDataset with an attention_mask")
        max_length = int(dataset.tensors["attention_mask"].shape[1])
    return {
        "format": FORMAT,
        "unit": unit,
        "teacher_weights": model_fingerprint(teacher),
        "teacher_config": config_fingerprint(teacher),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "data": data_fingerprint(dataset, unit),
        "num_examples": len(dataset),  # type: ignore[arg-type]
        "vocab_size": int(vocab_size),
        "k": k,
        "encoding": asdict(encoding),
        "features": sorted(features),
    }


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:12] + "…"


def compare_meaning(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise :class:`CacheError` naming the first field of ``expected`` (in
    :data:`CHECKED_FIELDS` order) whose value differs from the cache's."""
    for name in CHECKED_FIELDS:
        if name in expected and found.get(name) != expected[name]:
            raise CacheError(
                f"teacher cache {path}: {name} differs (cache {_short(found.get(name))}, "
                f"now {_short(expected[name])}): it was built for a different {_WHAT[name]}. "
                "Build a new cache (potstill cache) or point to the right one."
            )


def _cache_id(meaning: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meaning, sort_keys=True).encode()).hexdigest()


# ---- encoding rows -----------------------------------------------------------------------------


def _id_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


def _shuffle(a: np.ndarray) -> bytes:
    """Bytes grouped by significance (all low bytes, then all high bytes …): deflates better."""
    return a.view(np.uint8).reshape(-1, a.itemsize).T.tobytes()


def _unshuffle(buf: bytes, dtype: np.dtype, n: int) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    return np.frombuffer(buf, np.uint8).reshape(size, n).T.copy().view(dtype).reshape(-1)


def topk_rows(
    logits: torch.Tensor, k: int, vocab_size: int, encoding: Encoding
) -> dict[str, torch.Tensor]:
    """Top-k rows of ``logits`` ``(n, V)`` (temperature 1) as stored: ``ids``, ``logprobs``
    (``q8``: bytes, with ``top`` holding each row's largest log-prob), ``tail``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    if k == logp.shape[-1]:
        tail = torch.zeros(values.shape[0])
    else:
        # the mass outside the top-k summed directly, not 1 − Σ top (no cancellation)
        tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1).exp()
    rows = {"ids": ids.to(_id_dtype(vocab_size)), "tail": tail}
    if encoding.logprobs == "q8":
        top = values[:, :1].half()
        steps = ((top.float() - values) / Q8_STEP).round().clamp(0, 255)
        rows.update(logprobs=steps.to(torch.uint8), top=top.reshape(-1))
    else:
        rows["logprobs"] = values.to(getattr(torch, encoding.logprobs))
    if encoding.lossy:
        rows["tail"] = tail.half()
    return rows


def _compress(rows: Mapping[str, torch.Tensor]) -> bytes:
    """Top-k rows as one deflated blob: per row, entries sorted by id, ids as gaps; every
    array byte-shuffled."""
    ids = rows["ids"].to(torch.int64)
    order = ids.argsort(dim=-1)
    ids = ids.gather(-1, order)
    gaps = torch.cat([ids[:, :1], ids.diff(dim=-1)], dim=-1).to(rows["ids"].dtype)
    values = rows["logprobs"].gather(-1, order)
    parts = [_shuffle(gaps.numpy()), _shuffle(values.numpy())]
    parts += [_shuffle(rows[name].numpy()) for name in ("top", "tail") if name in rows]
    return zlib.compress(b"".join(parts), 6)


def _decompress(
    blob: bytes, n: int, k: int, dtypes: Mapping[str, torch.dtype]
) -> dict[str, torch.Tensor]:
    data = zlib.decompress(blob)
    out: dict[str, torch.Tensor] = {}
    at = 0
    for name, count in (("ids", n * k), ("logprobs", n * k), ("top", n), ("tail", n)):
        if name not in dtypes:
            continue
        np_dtype = torch.empty(0, dtype=dtypes[name]).numpy().dtype
        size = count * np_dtype.itemsize
        out[name] = torch.from_numpy(_unshuffle(data[at : at + size], np_dtype, count))
        at += size
    out["ids"] = out["ids"].to(torch.int64).reshape(n, k).cumsum(dim=-1)
    out["logprobs"] = out["logprobs"].reshape(n, k)
    return out


def decode_topk(rows: Mapping[str, torch.Tensor], encoding: Encoding) -> TopK:
    """Stored top-k rows back to a :class:`TopK` in float32 (int64 ids). Rounded encodings are
    renormalised so the k log-probabilities and the tail sum to one."""
    ids = rows["ids"].to(torch.int64)
    if encoding.logprobs == "q8":
        logprobs = rows["top"].float().unsqueeze(-1) - rows["logprobs"].float() * Q8_STEP
    else:
        logprobs = rows["logprobs"].float()
    tail = rows["tail"].float()
    if encoding.lossy and logprobs.numel():
        total = torch.logaddexp(logprobs.logsumexp(-1), tail.clamp_min(1e-30).log())
        logprobs = logprobs - total.unsqueeze(-1)
        tail = tail / total.exp()
    return TopK(ids=ids, logprobs=logprobs, tail_mass=tail)


# ---- writing -----------------------------------------------------------------------------------


@dataclass
class CacheStatus:
    """Where a cache stands: its shards, which are written, and where it lives."""

    path: Path
    num_shards: int
    done: list[int]
    num_examples: int
    bytes: int
    positions: int
    parts: dict[str, int] = field(default_factory=dict)
    """Each part record (``"i/N"``) and how many shards it wrote."""

    @property
    def complete(self) -> bool:
        """Every shard is written and recorded."""
        return len(self.done) == self.num_shards

    @property
    def missing(self) -> list[int]:
        """Shards not written yet."""
        done = set(self.done)
        return [j for j in range(self.num_shards) if j not in done]


def parse_part(text: str) -> tuple[int, int]:
    """``"i/N"`` (``i`` from 0 to N−1) as ``(i, N)``; ValueError naming the format otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 ≤ i < N (parts are numbered from 0)")
    return i, n


def _part_file(path: Path, part: tuple[int, int]) -> Path:
    return path / "parts" / f"part-{part[0]:05d}-of-{part[1]:05d}.json"


def _shard_name(j: int) -> str:
    return f"shards/shard-{j:06d}.safetensors"


def _read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{what} {file} is unreadable ({e})") from e


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the cache at ``path``; :class:`CacheError` if there is none."""
    path = Path(path)
    file = path / "manifest.json"
    if not file.exists():
        what = (
            "is not a potstill teacher cache (no manifest.json)"
            if path.exists()
            else ("does not exist")
        )
        raise CacheError(f"teacher cache {path} {what}")
    manifest = _read_json(file, "teacher cache manifest")
    if manifest.get("meaning", {}).get("format") != FORMAT:
        raise CacheError(
            f"{file} is not a {FORMAT} manifest (format "
            f"{manifest.get('meaning', {}).get('format')!r})"
        )
    return manifest


def shard_records(path: str | os.PathLike, manifest: Mapping[str, Any]) -> dict[int, dict]:
    """Every recorded shard of the cache, from all part records: shard index → record."""
    path = Path(path)
    records: dict[int, dict] = {}
    for file in sorted((path / "parts").glob("part-*.json")):
        part = _read_json(file, "teacher cache part record")
        if part.get("cache_id") != manifest["cache_id"]:
            raise CacheError(
                f"{file} belongs to another cache (cache_id {str(part.get('cache_id'))[:12]}…, "
                f"manifest {manifest['cache_id'][:12]}…); remove it"
            )
        for key, record in part.get("shards", {}).items():
            records.setdefault(int(key), record)
    return records


def cache_status(path: str | os.PathLike) -> CacheStatus:
    """How far the cache at ``path`` is filled (reads the manifest and part records only)."""
    path = Path(path)
    manifest = read_manifest(path)
    records = shard_records(path, manifest)
    parts = {}
    for file in sorted((path / "parts").glob("part-*.json")):
        part = _read_json(file, "teacher cache part record")
        parts[f"{part['part']}/{part['parts']}"] = len(part.get("shards", {}))
    return CacheStatus(
        path=path,
        num_shards=manifest["num_shards"],
        done=sorted(records),
        num_examples=manifest["meaning"]["num_examples"],
        bytes=sum(r["bytes"] for r in records.values()),
        positions=sum(r["positions"] for r in records.values()),
        parts=parts,
    )


def _default_shard_size(n: int, row_bytes: int, rows_per_example: int) -> int:
    per_example = max(1, row_bytes * rows_per_example)
    return max(1, min(n, SHARD_TARGET_BYTES // per_example))


def _row_bytes(k: int | None, vocab: int, encoding: Encoding) -> int:
    if k is None:
        return vocab * (4 if encoding.logits == "float32" else 2)
    value = {"float32": 4, "float16": 2, "q8": 1}[encoding.logprobs]
    return k * (_id_dtype(vocab).itemsize + value) + 4


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
            "cache_id": _cache_id(meaning),
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
    teacher: nn.Module,
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
) -> CacheStatus:
    """Run a frozen teacher over ``dataset`` once and write its signal to the cache at ``path``.

    ``unit="example"`` stores one row per example (``forward`` gives ``(B, V)``); ``"token"``
    one row per real token (``forward`` gives ``(B, T, V)``; batches carry ``attention_mask``).
    ``k`` None stores dense logits, an int the top-k form (see the module doc and
    :class:`Encoding`). ``taps`` (name → module path) adds those modules' outputs, stored per
    row too. ``part=(i, N)`` writes only shards ``j`` with ``j % N == i``, so N processes or
    machines fill one cache together. Shards already recorded (by any part) are skipped, so an
    interrupted call is continued by calling it again. Returns the cache's status.
    """
    path = Path(path)
    encoding = encoding or Encoding()
    i_part, n_parts = part
    if not (n_parts >= 1 and 0 <= i_part < n_parts):
        raise ValueError(f"part must be (i, N) with 0 ≤ i < N, got {part}")
    freeze(teacher)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the dataset is empty: nothing to cache")
    live = LiveTeacher(teacher, forward=forward, taps=taps)
    try:
        probe = live.signal(make_batch(dataset, torch.arange(min(2, n))))
        assert probe.logits is not None
        vocab = probe.logits.shape[-1]
        if k is not None and not 1 <= k <= vocab:
            raise ValueError(f"k must lie in [1, V={vocab}], got {k}")
        meaning = cache_meaning(
            teacher, dataset, unit=unit, k=k, vocab_size=vocab, encoding=encoding,
            tokenizer=tokenizer, features=sorted(probe.features),
        )  # fmt: skip
        length = meaning["max_length"] or 1
        manifest = _open_manifest(
            path, meaning, shard_size, _row_bytes(k, vocab, encoding), length, teacher_name
        )
        mine = [j for j in range(manifest["num_shards"]) if j % n_parts == i_part]
        record_file = _part_file(path, part)
        record = (
            _read_json(record_file, "teacher cache part record")
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
        bar = tqdm(
            total=total, desc=f"teacher cache {i_part}/{n_parts}", unit="ex",
            disable=None if progress is None else not progress, dynamic_ncols=True,
        )  # fmt: skip
        t0, tokens = time.perf_counter(), 0
        for j in todo:
            lo, hi = j * size, min(n, (j + 1) * size)
            tensors = _shard_tensors(
                live, dataset, range(lo, hi), unit, k, vocab, encoding, batch_size, bar
            )
            tokens += int(tensors["offsets"][-1])
            file = path / _shard_name(j)
            meta = {"cache_id": manifest["cache_id"], "shard": str(j), "examples": f"{lo}:{hi}"}
            atomic_save_safetensors(tensors, file, metadata=meta)
            record["shards"][str(j)] = {
                "file": _shard_name(j),
                "examples": [lo, hi],
                "positions": int(tensors["offsets"][-1]),
                "bytes": file.stat().st_size,
                "sha256": sha256_file(file),
                "host": socket.gethostname(),
            }
            record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            atomic_write_text(record_file, json.dumps(record, indent=1))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}")
        bar.close()
    finally:
        live.close()
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


def _shard_ok(path: Path, record: Mapping[str, Any]) -> bool:
    file = path / record["file"]
    return (
        file.exists()
        and file.stat().st_size == record["bytes"]
        and sha256_file(file) == record["sha256"]
    )


@torch.no_grad()
def _shard_tensors(
    live: LiveTeacher,
    dataset: Dataset,
    examples: range,
    unit: Unit,
    k: int | None,
    vocab: int,
    encoding: Encoding,
    batch_size: int,
    bar: Any,
) -> dict[str, torch.Tensor]:
    """The tensors of one shard: rows of ``examples`` in order, ``offsets`` (rows per example,
    cumulated), and for compressed top-k rows one ``blob`` with ``blob_offsets`` (one deflated
    block per ``encoding.block`` examples)."""
    columns: dict[str, list[torch.Tensor]] = {}
    blobs: list[bytes] = []
    pending: list[dict[str, torch.Tensor]] = []  # top-k rows of the block being filled
    counts: list[int] = []

    def flush() -> None:
        if pending:
            blobs.append(_compress({n: torch.cat([p[n] for p in pending]) for n in pending[0]}))
            pending.clear()

    index = torch.arange(examples.start, examples.stop)
    for lo in range(0, len(index), batch_size):
        batch = make_batch(dataset, index[lo : lo + batch_size])
        signal = live.signal(batch)
        assert signal.logits is not None
        mask = batch["attention_mask"] if unit == "token" else None
        logit_rows = _rows_of(signal.logits, mask)
        feature_rows = {name: _rows_of(t, mask) for name, t in signal.features.items()}
        for e, rows in enumerate(logit_rows):
            counts.append(rows.shape[0])
            if k is None:
                stored = {"logits": rows.to(getattr(torch, encoding.logits))}
            else:
                stored = topk_rows(rows, k, vocab, encoding)
                if encoding.compression == "zlib":
                    pending.append(stored)
                    stored = {}
                    if len(pending) == encoding.block:
                        flush()
            for name, feats in feature_rows.items():
                stored[f"feature.{name}"] = feats[e].to(getattr(torch, encoding.features))
            for name, t in stored.items():
                columns.setdefault(name, []).append(t.contiguous())
        bar.update(len(batch["index"]))
    flush()
    tensors = {name: torch.cat(parts) for name, parts in columns.items()}
    tensors["offsets"] = torch.tensor([0, *np.cumsum(counts)], dtype=torch.int64)
    if blobs:
        sizes = [len(b) for b in blobs]
        tensors["blob"] = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        tensors["blob_offsets"] = torch.tensor([0, *np.cumsum(sizes)], dtype=torch.int64)
    return tensors


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
            expected["teacher_config"] = config_fingerprint(teacher)
        if tokenizer is not None:
            expected["tokenizer"] = tokenizer_fingerprint(tokenizer)
        if dataset is not None:
            if self.meaning["unit"] == "token" and isinstance(dataset, TensorDictDataset):
                expected["max_length"] = int(dataset.tensors["attention_mask"].shape[1])
            expected["num_examples"] = len(dataset)  # type: ignore[arg-type]
            expected["data"] = data_fingerprint(dataset, self.meaning["unit"])
        compare_meaning(self.path, self.meaning, expected)
        self.encoding = Encoding(**self.meaning["encoding"])
        self.records = shard_records(self.path, manifest)
        missing = [j for j in range(manifest["num_shards"]) if j not in self.records]
        if missing and not allow_incomplete:
            raise CacheError(
                f"teacher cache {self.path} is incomplete: {len(self.records)} of "
                f"{manifest['num_shards']} shards written (missing {_ranges(missing)}). Finish "
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
        bar = tqdm(
            items, desc="verifying teacher cache", unit="shard", leave=False,
            disable=(None if progress is None else not progress) if verify else True,
        )  # fmt: skip
        for j, record in bar:
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
        raw = _decompress(
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
            "ids": _id_dtype(self.meaning["vocab_size"]),
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
        index = batch.get("cache_index", batch["index"])
        if self.unit == "example" and self.k is None:
            rows = self._gather_examples(torch.as_tensor(index, dtype=torch.long))
            if rows is not None:
                return self.collate([rows], None)
        items = [self[int(i)] for i in index]
        return self.collate(items, batch.get("attention_mask") if self.unit == "token" else None)

    def subset(self, dataset: TensorDictDataset) -> TensorDictDataset:
        """The examples of ``dataset`` (the one cached) that this cache holds, each carrying
        its ``cache_index``: what to train on from an incomplete cache."""
        keep = self.available.nonzero().flatten()
        tensors = {name: t[keep] for name, t in dataset.tensors.items()}
        tensors["cache_index"] = keep
        return TensorDictDataset(tensors, trim_by=dataset.trim_by)


def _place(
    items: Sequence[Mapping[str, torch.Tensor]], mask: torch.Tensor, path: Path
) -> dict[str, torch.Tensor]:
    B, T = mask.shape
    counts = mask.sum(1).tolist()
    out: dict[str, torch.Tensor] = {}
    for name, first in items[0].items():
        if name == "ids":
            fill = torch.arange(first.shape[-1]).expand(B, T, -1).clone()
        elif name == "logprobs":
            fill = torch.full((B, T, first.shape[-1]), -math.log(first.shape[-1]))
        else:
            fill = torch.zeros((B, T, *first.shape[1:]), dtype=first.dtype)
        out[name] = fill
    for b, item in enumerate(items):
        rows = next(iter(item.values())).shape[0]
        if rows != counts[b]:
            raise CacheError(
                f"teacher cache {path}: batch row {b} has {counts[b]} real tokens but the cache "
                f"holds {rows} for that example: the data differs from the cached data"
            )
        for name, t in item.items():
            out[name][b][mask[b]] = t.to(out[name].dtype)
    return out


def _ranges(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0–2, 5"``."""
    spans: list[list[int]] = []
    for v in sorted(values):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in spans)


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


__all__ = [
    "CHECKED_FIELDS",
    "CacheError",
    "CacheStatus",
    "CachedTeacher",
    "Encoding",
    "build_logit_cache",
    "cache_meaning",
    "cache_status",
    "cached_or_live",
    "compare_meaning",
    "config_fingerprint",
    "data_fingerprint",
    "decode_topk",
    "parse_part",
    "read_manifest",
    "shard_records",
    "tokenizer_fingerprint",
    "topk_rows",
    "write_cache",
]
