"""Tokenized Arrow tables and their batches: text columns tokenized with ``datasets.map`` (whose
cache files on disk a later run and a resumed one reuse), texts longer than ``max_length``
counted and cut, never dropped; rows read a batch at a time from the memory-mapped table and
padded to the batch's longest row."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from .rows import DataError

if TYPE_CHECKING:
    from datasets import Dataset as Table

log = logging.getLogger("potstill")


def tokenize_table(
    table: Table,
    tokenizer: Any,
    text: str,
    *,
    max_length: int,
    prefix: str = "",
    text_pair: str | None = None,
    desc: str | None = None,
) -> tuple[Table, int]:
    """``table`` with ``{prefix}input_ids`` and ``{prefix}attention_mask`` (and token type ids
    when the tokenizer makes them) from column ``text`` (and ``text_pair``), cut to
    ``max_length`` tokens; returns it and the number of rows that were cut. ``datasets`` keeps
    the result in a cache file beside a file-backed table and reuses it on the next call."""

    def strings(values: list[Any]) -> list[str]:  # a missing text is an empty one
        return ["" if v is None else str(v) for v in values]

    def encode(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
        pairs = strings(rows[text_pair]) if text_pair is not None else None
        enc = tokenizer(strings(rows[text]), pairs, truncation=True, max_length=max_length)
        out = {f"{prefix}{k}": v for k, v in enc.items() if k in _TOKEN_KEYS}
        encodings = getattr(enc, "encodings", None)
        if encodings:  # fast tokenizers keep what truncation cut off
            out[f"{prefix}cut"] = [bool(e.overflowing) for e in encodings]
        else:
            out[f"{prefix}cut"] = [len(ids) >= max_length for ids in enc["input_ids"]]
        return out

    tokenized = table.map(encode, batched=True, desc=desc or f"tokenizing {text}")
    cut = column_sum(tokenized, f"{prefix}cut")
    return tokenized.remove_columns(f"{prefix}cut"), cut


_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def column_sum(table: Table, column: str) -> int:
    """The sum of a numeric (or boolean) column, computed by Arrow (no row goes to Python)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(table.data.column(column), "int64")).as_py() or 0)


def tokens_in(table: Table, column: str, *, not_equal: int | None = None) -> int:
    """How many values the list column holds in all (those other than ``not_equal``, given)."""
    import pyarrow.compute as pc

    values = pc.list_flatten(table.data.column(column))
    if not_equal is not None:
        return int(pc.sum(pc.cast(pc.not_equal(values, not_equal), "int64")).as_py() or 0)
    return len(values)


class TableDataset(Dataset):
    """Rows of an Arrow table (a ``datasets.Dataset``) as batches of tensors: ``columns`` maps
    each batch field to its column; list columns named in ``pad`` are padded right to the
    longest row of the batch (or to ``pad_to``) with their pad value. Only the rows of a batch
    are read."""

    def __init__(
        self,
        table: Table,
        columns: Mapping[str, str],
        pad: Mapping[str, int] | None = None,
        inputs: Sequence[str] | None = None,
        pad_to: int | None = None,
    ) -> None:
        missing = [c for c in columns.values() if c not in table.column_names]
        if missing:
            raise DataError(
                f"no column {', '.join(missing)}; the table has {', '.join(table.column_names)}"
            )
        self.table = table.select_columns(list(dict.fromkeys(columns.values())))
        self.columns = dict(columns)
        self.pad = dict(pad or {})
        self.pad_to = pad_to
        self.inputs = tuple(inputs) if inputs is not None else tuple(
            f for f in self.columns if f != "label"
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.table)

    def _tensors(self, rows: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        out = {}
        for name, column in self.columns.items():
            values = rows[column]
            if name in self.pad:
                width = self.pad_to or max((len(v) for v in values), default=0)
                pad = self.pad[name]
                values = [list(v) + [pad] * (width - len(v)) for v in values]
            out[name] = torch.tensor(values)
        return out

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at ``index`` by field (padded as described above), plus ``index``."""
        rows = self.table[index.tolist()]
        return {**self._tensors(rows), "index": index}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self._tensors(self.table[[int(i)]]).items()}

    def content_fingerprint(self, inputs_only: bool = False) -> str:
        """SHA-256 of the fields' Arrow buffers in row order (the inputs only, with
        ``inputs_only``): what a teacher cache checks before it is reused."""
        h = hashlib.sha256(str(len(self)).encode())
        for name in sorted(self.columns):
            if inputs_only and name not in self.inputs:
                continue
            h.update(name.encode())
            # one hash per nesting level, fed chunk by chunk: the same rows in other chunkings
            # give the same bytes at every level
            levels: list[Any] = []
            for chunk in self.table.data.column(self.columns[name]).chunks:
                for i, part in enumerate(_buffers(chunk)):
                    if i == len(levels):
                        levels.append(hashlib.sha256())
                    levels[i].update(part)
            for level in levels:
                h.update(level.digest())
        return h.hexdigest()


def _buffers(array: Any) -> list[bytes]:
    """The values of an Arrow array as bytes, offsets and nesting resolved (so two tables with
    the same rows in other chunkings hash alike)."""
    import pyarrow as pa

    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = array.value_lengths().fill_null(0)
        return [lengths.to_numpy(zero_copy_only=False).tobytes(), *_buffers(array.flatten())]
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return ["".join(f"{s}\x00" for s in array.to_pylist()).encode()]
    return [array.to_numpy(zero_copy_only=False).tobytes()]


class TokenRows(TableDataset):
    """A causal LM's token rows in an Arrow table (``input_ids``, and ``labels`` with -100 on
    what is not trained), read a batch at a time: each batch holds ``input_ids`` (padded right
    with ``pad_token_id`` to the batch's longest row), ``attention_mask`` (1 on each row's own
    tokens), ``labels`` (padded with -100) and ``prompt_length`` (the first trained position; 0
    without labels) — the fields and shapes of the in-memory token datasets, so the loop, the
    teacher cache and the evaluation read either alike. ``max_length`` is the longest row.
    ``fields`` are per-row tensors carried into every batch (a cache's ``cache_index``)."""

    def __init__(
        self, table: Table, pad_token_id: int, fields: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        import pyarrow.compute as pc

        if len(table) == 0:
            raise DataError(
                "data: no training examples are left (see the log for what was left out)"
            )
        if getattr(table, "_indices", None) is not None:  # a selection: Arrow counts the rows
            table = table.flatten_indices()  # it holds, written beside the table on disk
        columns = {"input_ids": "input_ids"}
        pad = {"input_ids": int(pad_token_id)}
        if "labels" in table.column_names:
            columns["labels"], pad["labels"] = "labels", -100
        super().__init__(table, columns, pad, inputs=("input_ids",))
        self.pad_token_id = int(pad_token_id)
        lengths = pc.list_value_length(self.table.data.column("input_ids"))
        self.max_length = int(pc.max(lengths).as_py() or 0)
        self.fields = {k: v for k, v in (fields or {}).items()}

    def _tensors(self, rows: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        out = super()._tensors(rows)
        lengths = torch.tensor([len(r) for r in rows["input_ids"]])
        width = out["input_ids"].shape[1]
        out["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()
        if "labels" in out:
            trained = out["labels"] != -100
            out["prompt_length"] = torch.where(trained.any(1), trained.long().argmax(1), 0)
        else:
            out["prompt_length"] = torch.zeros(len(lengths), dtype=torch.long)
        return out

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at ``index`` (padded to their longest), their fields, and ``index``."""
        out = super().batch(index)
        return {**out, **{k: v[index] for k, v in self.fields.items()}}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch(torch.tensor([int(i)])).items() if k != "index"}

    def select(self, index: torch.Tensor, **fields: torch.Tensor) -> TokenRows:
        """The rows at ``index`` with ``fields`` added; ``max_length`` stays the whole
        table's (what a cache of it recorded)."""
        kept = {k: v[index] for k, v in self.fields.items()}
        rows = TokenRows(self.table.select(index.tolist()), self.pad_token_id, {**kept, **fields})
        rows.max_length = self.max_length
        return rows

    def trained_tokens(self) -> int:
        """The tokens that are trained: those whose label is not -100, or every token of rows
        without labels (a corpus), counted by Arrow."""
        if "labels" in self.columns:
            return tokens_in(self.table, "labels", not_equal=-100)
        return tokens_in(self.table, "input_ids")
