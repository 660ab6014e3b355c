"""Built-in model families (MLP, small CNN) and a model folder format: weights in safetensors
beside a JSON spec, so a saved teacher or student reloads without pickles."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_model as _load_weights
from torch import nn

from .io import atomic_save_module, atomic_write_text

SPEC_FILE = "potstill_model.json"
WEIGHTS_FILE = "model.safetensors"


class ArchSpec(BaseModel):
    """A built-in architecture: ``mlp`` (hidden widths) or ``cnn`` (conv channels, then hidden
    widths)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["mlp", "cnn"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [256], description="widths of hidden layers")
    channels: list[int] = Field(default_factory=list, description="cnn only: conv channels")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    input_shape: list[int] = Field(default_factory=lambda: [1, 28, 28])
    num_classes: int = Field(10, ge=2)


def build_model(spec: ArchSpec) -> nn.Module:
    """Build an untrained model from a spec (PyTorch's default initialisation)."""
    layers: list[nn.Module] = []
    shape = list(spec.input_shape)
    if spec.kind == "cnn":
        if not spec.channels:
            raise ValueError("arch.channels: a cnn needs at least one conv layer, e.g. [16, 32]")
        c = shape[0]
        for out_c in spec.channels:
            layers += [nn.Conv2d(c, out_c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = out_c
            shape = [c, shape[1] // 2, shape[2] // 2]
    layers.append(nn.Flatten())
    width = math.prod(shape)
    for h in spec.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = h
    layers.append(nn.Linear(width, spec.num_classes))
    return nn.Sequential(*layers)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def save_model_folder(
    model: nn.Module,
    folder: str | os.PathLike,
    spec: ArchSpec | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save weights (safetensors) and, for built-in models, the spec; returns the weights file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = atomic_save_module(model, folder / WEIGHTS_FILE)
    meta: dict[str, Any] = {"spec": spec.model_dump() if spec else None, **(extra or {})}
    atomic_write_text(folder / SPEC_FILE, json.dumps(meta, indent=2))
    return path


def load_model_folder(folder: str | os.PathLike) -> tuple[nn.Module, ArchSpec]:
    """Load a built-in model saved by :func:`save_model_folder`."""
    folder = Path(folder)
    spec_path = folder / SPEC_FILE
    if not spec_path.exists():
        raise FileNotFoundError(
            f"{spec_path} not found: {folder} is not a potstill model folder "
            f"(it needs {SPEC_FILE} and {WEIGHTS_FILE}, as written by potstill)"
        )
    meta = json.loads(spec_path.read_text())
    if not meta.get("spec"):
        raise ValueError(f"{spec_path} has no built-in architecture spec; load the module yourself")
    spec = ArchSpec.model_validate(meta["spec"])
    model = build_model(spec)
    _load_weights(model, str(folder / WEIGHTS_FILE))
    return model, spec
