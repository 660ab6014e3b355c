"""How a teacher cache stores rows: the :class:`Encoding` (dense logits, or top-k ids,
log-probabilities as float32 / float16 / q8 and the tail mass), zlib blocks of gap-coded,
byte-shuffled rows, and decoding them back into a :class:`~potstill.signal.TopK`."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..signal import TopK

Q8_STEP = 1.0 / 16.0
"""Width of one ``q8`` step in nats: 255 steps reach 15.9 nats below a row's top log-prob."""


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


# ---- encoding rows -----------------------------------------------------------------------------


def id_dtype(vocab_size: int) -> torch.dtype:
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
    return encode_topk(ids, values, tail, vocab_size, encoding)


def narrow_topk(
    ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse rows ``(n, K)`` (log-probabilities descending, as a server answers them) cut to
    their first ``k ≤ K`` entries; the mass of those dropped joins the tail."""
    if k > ids.shape[-1]:
        raise ValueError(f"cannot keep the top {k} of rows holding {ids.shape[-1]} entries")
    if k == ids.shape[-1]:
        return ids, logprobs.float(), tail.float()
    dropped = logprobs[:, k:].double().logsumexp(-1).exp()
    return ids[:, :k], logprobs[:, :k].float(), (tail.double() + dropped).float()


def encode_topk(
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail: torch.Tensor,
    vocab_size: int,
    encoding: Encoding,
) -> dict[str, torch.Tensor]:
    """Top-k rows ``(n, k)`` (log-probabilities descending, ``tail`` ``(n,)``) as stored."""
    rows = {"ids": ids.to(id_dtype(vocab_size)), "tail": tail.float()}
    if encoding.logprobs == "q8":
        top = logprobs[:, :1].half()
        steps = ((top.float() - logprobs) / Q8_STEP).round().clamp(0, 255)
        rows.update(logprobs=steps.to(torch.uint8), top=top.reshape(-1))
    else:
        rows["logprobs"] = logprobs.to(getattr(torch, encoding.logprobs))
    if encoding.lossy:
        rows["tail"] = tail.half()
    return rows


def compress_rows(rows: Mapping[str, torch.Tensor]) -> bytes:
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


def decompress_rows(
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
