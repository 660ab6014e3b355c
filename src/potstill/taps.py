"""Taps: named forward hooks on modules chosen by dotted path, so any model gives up its
intermediate outputs (hidden states, attention maps, feature maps) without being rewritten.

>>> with Taps(model, {"h": "encoder.layer.*", "att": TapSpec("encoder.layer.1.attention", 1)}) as t:
...     model(x)                                                      # doctest: +SKIP
...     t.outputs["h.0"], t.outputs["att"]                            # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class TapError(ValueError):
    """A tap path matches no module, or an output cannot be selected as asked."""


@dataclass(frozen=True)
class TapSpec:
    """Which module outputs to capture: a dotted ``path`` whose components may hold ``*``
    wildcards (``encoder.layer.*``; ``""`` is the model itself), and what to take from the output:
    ``select`` = an index into a tuple output, or an attribute / key of a model-output object.
    A tuple output with no ``select`` gives its first element."""

    path: str
    select: int | str | None = None


TapsLike = Mapping[str, "TapSpec | str"]


def _as_spec(spec: TapSpec | str | Mapping[str, Any]) -> TapSpec:
    if isinstance(spec, TapSpec):
        return spec
    if isinstance(spec, str):
        return TapSpec(spec)
    return TapSpec(**spec)


def match_modules(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that ``path`` names, in ``named_modules`` order.

    Raises :class:`TapError` listing near matches when there is none.
    """
    if path == "":
        return [("", model)]
    pattern = path.split(".")
    found = [
        (name, module)
        for name, module in model.named_modules()
        if name
        and len(name.split(".")) == len(pattern)
        and all(fnmatch.fnmatchcase(a, b) for a, b in zip(name.split("."), pattern, strict=True))
    ]
    if not found:
        names = [name for name, _ in model.named_modules() if name]
        probe = path.replace("*", "0")
        near = difflib.get_close_matches(probe, names, n=6, cutoff=0.5)
        hint = f"; near matches: {', '.join(near)}" if near else ""
        raise TapError(
            f"tap path {path!r} matches no module of {type(model).__name__}{hint} "
            f"(module names come from model.named_modules())"
        )
    return found


def select_output(output: Any, select: int | str | None, where: str) -> torch.Tensor:
    """Pick the tensor a tap asks for out of a module's output."""
    if select is None:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return output[0]
        keys = list(output.keys()) if isinstance(output, Mapping) else []
        listed = f" (keys: {', '.join(map(str, keys))})" if keys else ""
        raise TapError(
            f"tap {where}: the module returns {type(output).__name__}, not a tensor; set "
            f"select to an index or name{listed}"
        )
    try:
        if isinstance(select, int):
            value = output[select]
        elif isinstance(output, Mapping):
            value = output[select]
        else:
            value = getattr(output, select)
    except (IndexError, KeyError, AttributeError, TypeError) as e:
        raise TapError(
            f"tap {where}: cannot select {select!r} from a {type(output).__name__} output ({e})"
        ) from None
    if not isinstance(value, torch.Tensor):
        raise TapError(
            f"tap {where}: select {select!r} gives {type(value).__name__}, not a tensor (for "
            "attention weights, Hugging Face models need attn_implementation='eager')"
        )
    return value


class Taps:
    """Forward hooks that record the outputs of named modules on every forward pass.

    ``specs`` maps a name to a :class:`TapSpec` or a plain path. A path with wildcards expands to
    one output per matching module, named ``name.0``, ``name.1``, … in module order; a plain path
    gives ``name``. After a forward pass, ``outputs`` holds the tensors of that pass. Hooks stay
    until :meth:`remove` (or the end of a ``with`` block); afterwards the model has none of ours.
    """

    def __init__(self, model: nn.Module, specs: TapsLike, *, detach: bool = False) -> None:
        self.model = model
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self.groups: dict[str, list[str]] = {}
        self.paths: dict[str, str] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.closed = False
        try:
            for name, raw in specs.items():
                spec = _as_spec(raw)
                matches = match_modules(model, spec.path)
                wildcard = any(c in spec.path for c in "*?[")  # fnmatch's pattern characters
                keys = [f"{name}.{i}" for i in range(len(matches))] if wildcard else [name]
                self.groups[name] = keys
                for key, (mname, module) in zip(keys, matches, strict=True):
                    self.paths[key] = mname
                    self._handles.append(module.register_forward_hook(self._hook(key, spec)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, key: str, spec: TapSpec):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            value = select_output(output, spec.select, f"{key!r} ({self.paths[key] or 'model'})")
            self.outputs[key] = value.detach() if self.detach else value

        return hook

    @property
    def names(self) -> list[str]:
        """Every output name, wildcards expanded."""
        return [k for keys in self.groups.values() for k in keys]

    def clear(self) -> None:
        """Forget the last pass's outputs (they hold activations and their graph)."""
        self.outputs = {}

    def remove(self) -> None:
        """Remove every hook; the model is left as it was."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.outputs = {}
        self.closed = True

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def tapped_forward(taps: Taps, forward, model: nn.Module, batch: Mapping[str, Any]):
    """Run ``forward(model, batch)`` and return its logits with the taps' outputs of this pass."""
    taps.clear()
    logits = forward(model, batch)
    missing = [n for n in taps.names if n not in taps.outputs]
    if missing:
        raise TapError(
            f"taps {missing} captured nothing in this forward pass: their modules "
            f"({', '.join(taps.paths[m] for m in missing)}) were not called"
        )
    features = taps.outputs
    taps.outputs = {}
    return logits, features


def tap_counts(model: nn.Module, specs: TapsLike) -> dict[str, int]:
    """How many outputs each tap name gives on ``model`` (wildcards count their matches)."""
    return {name: len(match_modules(model, _as_spec(raw).path)) for name, raw in specs.items()}
