"""What a teacher cache is: its folder layout (manifest, part records, shards), the manifest
fields that pin what it means (teacher, tokenizer, data, k, encoding) and how they are compared,
and reading a cache's status. See :mod:`potstill.cache` for the whole picture."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn
from torch.utils.data import Dataset

from ..data.tensors import TensorDictDataset, fingerprint, token_width
from ..teachers import model_fingerprint
from .codec import Encoding

log = logging.getLogger("potstill")

FORMAT = "potstill.teacher-cache.v2"


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


# ---- what a cache means ------------------------------------------------------------------------


CONFIG_NOT_MEANING = (
    "transformers_version", "_name_or_path", "_commit_hash", "architectures", "dtype",
    "torch_dtype",
)  # fmt: skip
"""Config keys that say where a model came from or how it was saved, not what it computes
(``save_pretrained`` fills in ``architectures`` and ``dtype``; a folder's path is
``_name_or_path``; the weights' dtype is in the weights' fingerprint): a teacher reloaded from
its export, or copied elsewhere, keeps its caches."""


def config_fingerprint(model: nn.Module, *, legacy: bool = False) -> str | None:
    """SHA-256 of a Hugging Face model's config (JSON, sorted keys) without
    :data:`CONFIG_NOT_MEANING`, None for plain modules. ``legacy``: as the caches written before
    the fault issue computed it (only ``transformers_version`` left out)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    left_out = ("transformers_version",) if legacy else CONFIG_NOT_MEANING
    d = {k: v for k, v in config.to_dict().items() if k not in left_out}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def expected_config(found: Mapping[str, Any], model: nn.Module) -> str | None:
    """The ``teacher_config`` a cache whose meaning is ``found`` must hold for ``model``: the
    fingerprint, or the legacy one where the cache was written with it."""
    legacy = config_fingerprint(model, legacy=True)
    return legacy if found.get("teacher_config") == legacy else config_fingerprint(model)


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
    teacher: nn.Module | str,
    dataset: Dataset,
    *,
    unit: Unit,
    k: int | None,
    vocab_size: int,
    encoding: Encoding,
    tokenizer: Any = None,
    features: Sequence[str] = (),
) -> dict[str, Any]:
    """The manifest fields that pin what a cache built from these inputs means; ``teacher``
    a model, or a served teacher's fingerprint (:meth:`ServedTeacher.fingerprint`), which
    stands for its weights (and no config is recorded)."""
    max_length = None
    if unit == "token":
        max_length = token_width(dataset)
        if max_length is None:
            raise ValueError("a token cache needs token rows (input_ids with an attention mask)")
    return {
        "format": FORMAT,
        "unit": unit,
        "teacher_weights": teacher if isinstance(teacher, str) else model_fingerprint(teacher),
        "teacher_config": None if isinstance(teacher, str) else config_fingerprint(teacher),
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


def cache_id(meaning: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meaning, sort_keys=True).encode()).hexdigest()


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


def part_file(path: Path, part: tuple[int, int]) -> Path:
    return path / "parts" / f"part-{part[0]:05d}-of-{part[1]:05d}.json"


def shard_name(j: int) -> str:
    return f"shards/shard-{j:06d}.safetensors"


def read_json(file: Path, what: str) -> dict[str, Any]:
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
    manifest = read_json(file, "teacher cache manifest")
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
        part = read_json(file, "teacher cache part record")
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
        part = read_json(file, "teacher cache part record")
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
