"""Teacher sources: a live, frozen model, an ensemble of models, signals precomputed in memory
(here), or a cache of the signal on disk (:mod:`potstill.cache`). Each turns a batch into a
:class:`~potstill.signal.Signal`, so every loss works with every source."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from .data.tensors import iterate_batches
from .placement import model_device, on_device
from .progress import Progress
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

    ``shard=True`` under torchrun shards the teacher across the processes with FSDP2 (in place,
    on its first batch) for a teacher too big for one device: each process then holds a part
    of its weights, gathered block by block for each forward. Every process must then call
    :meth:`signal` in step (the Distiller's training loop does), so a sharded teacher cannot be
    evaluated by one process alone.

    >>> teacher = LiveTeacher(model, taps={"h": "encoder.layer.*"})  # doctest: +SKIP
    >>> teacher.signal({"input": x}).features["h.3"]                 # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        forward: ForwardFn = default_forward,
        taps: TapsLike | None = None,
        shard: bool = False,
    ) -> None:
        self.model = freeze(model)
        self.forward = forward
        self.taps = Taps(model, taps, detach=True) if taps else None
        self.shard = shard
        self._sharded = False

    @property
    def feature_names(self) -> set[str]:
        """Names of the features this teacher's signals carry."""
        return set(self.taps.names) if self.taps else set()

    @torch.no_grad()
    def signal(self, batch: Batch) -> Signal:
        """The teacher's logits on ``batch``, and its tapped features."""
        if self.model.training:  # someone called .train() on the shared module: undo it
            self.model.eval()
        if self.shard and not self._sharded:
            self._shard()
        batch = on_device(batch, model_device(self.model))  # the teacher's own device
        if self.taps is None:
            return Signal(logits=self.forward(self.model, batch).detach())
        if self.taps.closed:
            raise RuntimeError("this LiveTeacher was closed: its taps' hooks are removed")
        logits, features = tapped_forward(self.taps, self.forward, self.model, batch)
        return Signal(logits=logits.detach(), features=features)

    def _shard(self) -> None:
        from . import distributed

        if distributed.world_size() > 1:
            distributed.shard_blocks(self.model)
        self._sharded = True

    def close(self) -> None:
        """Remove the taps' hooks from the model."""
        if self.taps is not None:
            self.taps.remove()


class Ensemble(nn.Module):
    """Several models as one teacher: the mean of their outputs (logits), e.g. born-again
    generations combined. Every member runs on each batch."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The members' mean output."""
        return torch.stack([m(*args, **kwargs) for m in self.members]).mean(dim=0)


class PrecomputedTeacher:
    """Teacher signals computed once for every example of a dataset and kept in memory
    (float16 features), then served by example index: one teacher pass for many students."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        forward,
        taps: TapsLike | None = None,
        *,
        batch_size: int = 32,
        feature_dtype: torch.dtype = torch.float16,
    ) -> None:
        freeze(model)
        tap = Taps(model, taps, detach=True) if taps else None
        logits: list[torch.Tensor] = []
        feats: dict[str, list[torch.Tensor]] = {}
        n = len(dataset)  # type: ignore[arg-type]
        bar = Progress(n, "teacher signals", "ex")
        device = model_device(model)
        try:
            with torch.no_grad():
                for batch in iterate_batches(dataset, torch.arange(n), batch_size):
                    batch = on_device(batch, device)
                    if tap is None:
                        out, f = forward(model, batch), {}
                    else:
                        out, f = tapped_forward(tap, forward, model, batch)
                    logits.append(out.float().cpu())
                    for k, v in f.items():
                        feats.setdefault(k, []).append(v.to(feature_dtype).cpu())
                    bar.update(len(batch["index"]))
        finally:
            bar.close()
            if tap is not None:
                tap.remove()
        self.logits = torch.cat(logits)
        self.features = {k: torch.cat(v) for k, v in feats.items()}
        self.feature_names = set(self.features)

    def signal(self, batch: Mapping[str, Any]) -> Signal:
        """The stored signal of the batch's examples (features back in float32)."""
        idx = torch.as_tensor(batch["index"]).cpu()  # the stored signal is on the CPU
        return Signal(
            logits=self.logits[idx], features={k: v[idx].float() for k, v in self.features.items()}
        )


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
