"""Datasets of named tensors and their batches: one-operation batch indexing (with padding
trimmed), the seeded epoch order a resumed run repeats, and content fingerprints that tell a
cache which data it describes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch.utils.data import Dataset, TensorDataset


def fingerprint(ds: Dataset, inputs_only: bool = False) -> str:
    """SHA-256 of a dataset's content (inputs and labels, in order), as a hex string.

    With ``inputs_only`` the labels are left out: a teacher's outputs depend on the inputs alone,
    so one cache serves every labelling of the same inputs. TensorDatasets are hashed from their
    tensors directly; other datasets item by item.
    """
    if hasattr(ds, "content_fingerprint"):  # a table that hashes its own buffers
        return ds.content_fingerprint(inputs_only)
    h = hashlib.sha256()
    if isinstance(ds, TensorDictDataset):
        for name, t in sorted(ds.tensors.items()):
            if not inputs_only or name != "label":
                h.update(name.encode())
                _hash_tensor(h, t)
        return h.hexdigest()
    if isinstance(ds, TensorDataset):
        for t in ds.tensors[:1] if inputs_only else ds.tensors:
            _hash_tensor(h, t)
        return h.hexdigest()
    h.update(str(len(ds)).encode())  # type: ignore[arg-type]
    for i in range(len(ds)):  # type: ignore[arg-type]
        item = ds[i]
        parts = item if isinstance(item, (tuple, list)) else (item,)
        for t in parts[:1] if inputs_only else parts:
            _hash_tensor(h, torch.as_tensor(t))
    return h.hexdigest()


def _hash_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


class TensorDictDataset(Dataset):
    """Named tensors with the same first dimension; a batch holds each of them by name
    (``input_ids``, ``attention_mask``, …), indexed in one operation.

    With ``trim_by`` naming a right-padded ``(N, L)`` attention mask, each batch is cut to its
    longest real row: every ``(n, L, …)`` tensor loses the trailing columns that are padding in
    all of the batch's rows, so short examples do not pay for the longest one in the dataset.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], trim_by: str | None = None) -> None:
        sizes = {k: len(v) for k, v in tensors.items()}
        if not tensors or len(set(sizes.values())) != 1:
            raise ValueError(f"TensorDictDataset needs tensors of one length, got {sizes}")
        if trim_by is not None and (trim_by not in tensors or tensors[trim_by].dim() != 2):
            raise ValueError(f"trim_by={trim_by!r} must name an (N, L) tensor of the dataset")
        self.tensors = tensors
        self.trim_by = trim_by

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at ``index`` by name, trimmed as described above, plus ``index``."""
        batch = {k: v[index] for k, v in self.tensors.items()}
        if self.trim_by is not None:
            full = batch[self.trim_by].shape[1]
            real = batch[self.trim_by].any(dim=0).nonzero()
            keep = int(real.max()) + 1 if len(real) else 1
            if keep < full:
                batch = {
                    k: v[:, :keep] if v.dim() >= 2 and v.shape[1] == full else v
                    for k, v in batch.items()
                }
        return {**batch, "index": index}

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def token_width(dataset: Dataset) -> int | None:
    """The width of a token dataset: its longest row (an in-memory one's padded width, or a
    token table's ``max_length``); None for data that is not token rows."""
    if isinstance(dataset, TensorDictDataset):
        mask = dataset.tensors.get("attention_mask")
        return int(mask.shape[1]) if mask is not None and mask.dim() == 2 else None
    width = getattr(dataset, "max_length", None)
    return int(width) if width is not None else None


def make_batch(dataset: Dataset, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The examples at ``index`` as a batch dict ``{"input", "label", "index"}``.

    TensorDatasets are indexed in one operation; a dataset with its own ``batch(index)``
    (TensorDictDataset, :class:`~potstill.data.tokenized.TableDataset`) gives its named fields;
    other datasets item by item, each item being ``(input, label)``, an input alone, or a dict
    of named fields (kept by name).
    """
    if callable(getattr(dataset, "batch", None)):
        return dataset.batch(index)
    if isinstance(dataset, TensorDataset):
        tensors = [t[index] for t in dataset.tensors]
    else:
        from torch.utils.data import default_collate

        items = [dataset[int(i)] for i in index]
        if isinstance(items[0], Mapping):  # dict rows keep their field names (label too)
            return {**default_collate(items), "index": index}
        if isinstance(items[0], (tuple, list)):
            tensors = list(default_collate(items))
        else:
            tensors = [default_collate(items)]
    batch = {"input": tensors[0], "index": index}
    if len(tensors) > 1:
        batch["label"] = tensors[1]
    return batch


def iterate_batches(dataset: Dataset, order: torch.Tensor, batch_size: int, start: int = 0):
    """Yield batches of ``dataset`` in ``order``, ``batch_size`` examples each (the last may be
    smaller), beginning at batch number ``start``."""
    for lo in range(start * batch_size, len(order), batch_size):
        yield make_batch(dataset, order[lo : lo + batch_size])


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)
