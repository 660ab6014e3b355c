"""Teacher sources: a live, frozen model, or a cache of its logits on disk. Both turn a batch into
the same :class:`~potstill.signal.Signal`, so every loss works with either."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import __version__
from .data import fingerprint
from .io import atomic_save_safetensors
from .signal import Signal
from .taps import Taps, TapsLike, tapped_forward

log = logging.getLogger("potstill")

Batch = Mapping[str, Any]
ForwardFn = Callable[[nn.Module, Batch], torch.Tensor]


def default_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Call the model on ``batch["input"]``: the forward of plain classifiers."""
    return model(batch["input"])


class TeacherSource(Protocol):
    """Anything that turns a batch into a teacher Signal."""

    def signal(self, batch: Batch) -> Signal: ...


def freeze(model: nn.Module) -> nn.Module:
    """Put a model in eval mode and stop gradients to all its parameters (in place)."""
    model.eval()
    model.requires_grad_(False)
    return model


class LiveTeacher:
    """A frozen model run on each batch: eval mode, no gradients, no graph.

    ``taps`` (name → module path, see :mod:`potstill.taps`) adds the outputs of intermediate
    modules to the signal's ``features``; :meth:`close` removes their hooks.

    >>> teacher = LiveTeacher(model, taps={"h": "encoder.layer.*"})  # doctest: +SKIP
    >>> teacher.signal({"input": x}).features["h.3"]                 # doctest: +SKIP
    """

    def __init__(
        self, model: nn.Module, forward: ForwardFn = default_forward, taps: TapsLike | None = None
    ) -> None:
        self.model = freeze(model)
        self.forward = forward
        self.taps = Taps(model, taps, detach=True) if taps else None

    @property
    def feature_names(self) -> set[str]:
        """Names of the features this teacher's signals carry."""
        return set(self.taps.names) if self.taps else set()

    @torch.no_grad()
    def signal(self, batch: Batch) -> Signal:
        """The teacher's logits on ``batch``, and its tapped features."""
        if self.model.training:  # someone called .train() on the shared module: undo it
            self.model.eval()
        if self.taps is None:
            return Signal(logits=self.forward(self.model, batch).detach())
        if self.taps.closed:
            raise RuntimeError("this LiveTeacher was closed: its taps' hooks are removed")
        logits, features = tapped_forward(self.taps, self.forward, self.model, batch)
        return Signal(logits=logits.detach(), features=features)

    def close(self) -> None:
        """Remove the taps' hooks from the model."""
        if self.taps is not None:
            self.taps.remove()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CacheError(ValueError):
    """A teacher cache is damaged or does not match what it is used with."""


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(
        t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()


@torch.no_grad()
def build_logit_cache(
    teacher: nn.Module,
    dataset: Dataset,
    path: str | os.PathLike,
    *,
    forward: ForwardFn = default_forward,
    batch_size: int = 1024,
    progress: bool | None = None,
) -> Path:
    """Run a frozen teacher over ``dataset`` once and store its logits (float32) in ``path``.

    The file's metadata pins the dataset's content fingerprint, the teacher's weight fingerprint
    and a checksum of the logits; :class:`CachedTeacher` checks them on read.
    """
    from .data import iterate_batches

    freeze(teacher)
    parts = []
    n = len(dataset)  # type: ignore[arg-type]
    bar = tqdm(total=n, desc="teacher cache", unit="ex", disable=_no_bar(progress), leave=False)
    for batch in iterate_batches(dataset, torch.arange(n), batch_size):
        parts.append(forward(teacher, batch).detach().float().cpu())
        bar.update(len(batch["index"]))
    bar.close()
    logits = torch.cat(parts)
    meta = {
        "format": "potstill.logit-cache.v1",
        "dataset_sha256": fingerprint(dataset, inputs_only=True),
        "teacher_sha256": model_fingerprint(teacher),
        "logits_sha256": _digest(logits),
        "num_examples": str(n),
        "potstill_version": __version__,
    }
    return atomic_save_safetensors({"logits": logits}, path, metadata=meta)


def _no_bar(progress: bool | None) -> bool | None:
    # tqdm: disable=None hides the bar when stderr is not a terminal
    return None if progress is None else not progress


class CachedTeacher:
    """Teacher logits read from a cache written by :func:`build_logit_cache`.

    Batches must carry ``"index"``: the positions of their examples in the cached dataset.
    Pass ``dataset`` and/or ``teacher`` to check that the cache describes them; a mismatch raises
    :class:`CacheError` naming the field that differs.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dataset: Dataset | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"teacher cache {self.path} does not exist")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = dict(f.metadata() or {})
                logits = f.get_tensor("logits")
        except Exception as e:  # safetensors raises several types for damaged files
            raise CacheError(
                f"teacher cache {self.path} is damaged or unreadable ({e}); "
                "delete it and it will be rebuilt"
            ) from e
        if self.metadata.get("format") != "potstill.logit-cache.v1":
            raise CacheError(
                f"{self.path} is not a potstill logit cache (format="
                f"{self.metadata.get('format')!r})"
            )
        if _digest(logits) != self.metadata.get("logits_sha256"):
            raise CacheError(
                f"teacher cache {self.path}: logits checksum does not match; the file "
                "is damaged, delete it and it will be rebuilt"
            )
        expected = {}
        if dataset is not None:
            expected["dataset_sha256"] = fingerprint(dataset, inputs_only=True)
        if teacher is not None:
            expected["teacher_sha256"] = model_fingerprint(teacher)
        for field, value in expected.items():
            if self.metadata.get(field) != value:
                raise CacheError(
                    f"teacher cache {self.path}: {field} differs (cache "
                    f"{self.metadata.get(field, '?')[:12]}…, now {value[:12]}…): it "
                    "was built for another " + field.split("_")[0]
                )
        self.logits = logits

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def feature_names(self) -> set[str]:
        """A logit cache carries no intermediate features."""
        return set()

    def signal(self, batch: Batch) -> Signal:
        """The cached logits of the batch's examples."""
        return Signal(logits=self.logits[batch["index"]])


def cached_or_live(
    teacher: nn.Module,
    dataset: Dataset,
    path: str | os.PathLike | None,
    forward: ForwardFn = default_forward,
) -> LiveTeacher | CachedTeacher:
    """A CachedTeacher for ``dataset`` at ``path`` (built if missing, rebuilt if it does not match),
    or a LiveTeacher when ``path`` is None."""
    if path is None:
        return LiveTeacher(teacher, forward)
    if Path(path).exists():
        try:
            return CachedTeacher(path, dataset=dataset, teacher=teacher)
        except CacheError as e:
            log.warning("%s; rebuilding it", e)
    build_logit_cache(teacher, dataset, path, forward=forward)
    return CachedTeacher(path)
