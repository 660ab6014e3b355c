"""Where a run's models and batches live: :func:`resolve_device` turns the one setting
(``auto | cpu | cuda | cuda:N | mps``) into a device, with an error naming the field when the
machine has no such device; a :class:`Placement` puts the student, its batches and the
teacher's signals on that device, and a teacher runs its batches on its own device
(:func:`on_device`), so the two may live apart."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from .signal import Signal

M = TypeVar("M", bound=nn.Module)

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
"""What a device setting may say (in messages)."""
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def accelerator_backend() -> str | None:
    """The name of an out-of-tree accelerator registered as PyTorch's PrivateUse1 backend
    (Ascend's ``npu``, for one), which a device setting may then name like ``cuda``; None
    when no such backend is registered."""
    name = torch._C._get_privateuse1_backend_name()
    return None if name == "privateuseone" else name


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def check_device_form(spec: str, where: str = "device") -> str:
    """``spec`` when it is a device setting's form (whether this machine has the device is
    :func:`resolve_device`'s question, asked when a run starts); ValueError naming ``where``."""
    text = str(spec).strip().lower()
    other = accelerator_backend()
    if other is not None and re.match(rf"^{re.escape(other)}(:\d+)?$", text):
        return spec
    if not _DEVICE.match(text):
        forms = DEVICE_FORMS if other is None else f"{DEVICE_FORMS}, or {other}"
        named = f"{where}: " if where else ""
        raise ValueError(f"{named}unknown device {spec!r}; give {forms}")
    return spec


def resolve_device(spec: str | torch.device | None = "auto", where: str = "device") -> torch.device:
    """The device a setting names: ``auto`` (or None) is CUDA when a GPU is visible, else MPS,
    else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` must exist on this machine. A
    ValueError names the field (``where``), what was asked and what the machine has."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    check_device_form(text, where)
    other = accelerator_backend()
    if other is not None and text.split(":")[0] == other:
        return _accelerator(other, text, where)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _launch_index())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise ValueError(f"{where}: mps was asked for but this machine has no MPS device; "
                             "use cpu or auto")  # fmt: skip
        return torch.device("mps")
    if not torch.cuda.is_available():
        build = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(
            f"{where}: {text} was asked for but CUDA is not available here ({build}); use "
            "cpu or auto, or install torch built for CUDA on a machine with a GPU"
        )
    index = int(text.split(":")[1]) if ":" in text else _launch_index()
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"{where}: {text} was asked for but this machine has {count} GPU"
            f"{'s' if count != 1 else ''} (cuda:0 … cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def _launch_index() -> int:
    """The GPU of this process: ``LOCAL_RANK`` under ``torchrun`` (one GPU per process on a
    node), else the current device."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(local) % max(torch.cuda.device_count(), 1)
    return torch.cuda.current_device()


def _accelerator(name: str, text: str, where: str) -> torch.device:
    module = getattr(torch, name, None)
    if module is None or not module.is_available():
        raise ValueError(f"{where}: {text} was asked for but its backend reports no device")
    index = int(text.split(":")[1]) if ":" in text else module.current_device()
    if index >= module.device_count():
        raise ValueError(f"{where}: {text} was asked for but this machine has "
                         f"{module.device_count()} {name} device(s)")  # fmt: skip
    return torch.device(name, index)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for one with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's state dict on the CPU, a tied weight copied once (its names share one
    tensor, so writers store it once), for saving a model that lives on an accelerator
    without moving it; None for a model on the CPU (save it as it is)."""
    state = model.state_dict(keep_vars=True)
    if all(t.device.type == "cpu" for t in state.values()):
        return None
    copies: dict[int, torch.Tensor] = {}
    return {name: copies.setdefault(id(t), t.detach().to("cpu")) for name, t in state.items()}


def describe_device(device: torch.device) -> dict[str, Any]:
    """What a report says about a device: its name and, for a GPU, its model and memory."""
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gb=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}")  # fmt: skip
    return info


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak memory of ``device`` afresh (a GPU; nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """The most memory allocated on ``device`` since the last reset (GiB; None off a GPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def on_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor on ``device`` (others, and tensors already there, as they
    are); copies from pinned memory do not block."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


@dataclass(frozen=True)
class Placement:
    """The student, its batches and the teacher's signals on ``device`` (default: the CPU)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def of(cls, spec: str | torch.device | None, where: str = "device") -> Placement:
        """The placement a device setting names (see :func:`resolve_device`)."""
        return cls(resolve_device(spec, where))

    def model(self, model: M) -> M:
        """``model`` on this placement's device (moved in place; returned for chaining)."""
        return model.to(self.device)

    def batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch with every tensor on this placement's device (others as they are)."""
        return on_device(batch, self.device)

    def signal(self, signal: Signal) -> Signal:
        """A teacher's signal on this placement's device (itself when it is there already)."""
        tensors = [signal.logits, *signal.features.values()]
        if signal.topk is not None:
            tensors.append(signal.topk.ids)
        if all(t is None or t.device == self.device for t in tensors):
            return signal
        return signal.to(self.device, non_blocking=True)


CPU = Placement()
"""The CPU placement, the default."""
