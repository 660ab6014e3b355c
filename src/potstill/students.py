"""Shallower students derived from a Hugging Face teacher, DistilBERT-style: a subset of its
transformer layers, renumbered 0…k−1, plus every weight outside the layer stack, copied."""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["DERIVED_FROM_ATTR", "derive", "find_layer_stack", "spread_layers"]

DERIVED_FROM_ATTR = "potstill_derived_from"
"""Name of the config attribute where :func:`derive` records which teacher layers it kept."""

# Top-level config fields that may be lists of any length but are never indexed by layer.
_NOT_PER_LAYER = frozenset(
    {
        "architectures",
        "bad_words_ids",
        "begin_suppress_tokens",
        "forced_decoder_ids",
        "suppress_tokens",
        DERIVED_FROM_ATTR,
    }
)


def _check_int(name: str, value: Any) -> int:
    """``value`` as an int (bools and non-integers rejected with a ValueError)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def spread_layers(n_teacher: int, keep: int) -> list[int]:
    """``keep`` teacher layer indices (0-based) spread evenly over ``n_teacher`` layers.

    Index ``i`` is ``round(i·(n_teacher−1)/(keep−1))`` for ``i`` in ``range(keep)``, rounded
    half-up (exact integer arithmetic, not Python's banker's ``round``), so the first and last
    teacher layers are always kept: ``spread_layers(6, 3) == [0, 3, 5]``,
    ``spread_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]``, and
    ``keep == n_teacher`` keeps every layer. ``keep == 1`` gives ``[0]``: the one kept layer is
    the first, the one that reads the embeddings it was trained on. Requires
    ``1 ≤ keep ≤ n_teacher``.
    """
    n = _check_int("n_teacher", n_teacher)
    k = _check_int("keep", keep)
    if n < 1:
        raise ValueError(f"n_teacher must be positive, got {n}")
    if not 1 <= k <= n:
        raise ValueError(f"keep must lie in [1, n_teacher] = [1, {n}], got keep={k}")
    if k == 1:
        return [0]
    # floor(i·(n−1)/(k−1) + 1/2) == (2·i·(n−1) + (k−1)) // (2·(k−1)), without float error.
    return [(2 * i * (n - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]


def _config_layer_count(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise ValueError(
            f"{type(model).__name__} has no config.num_hidden_layers; cannot tell which module "
            "list is its layer stack"
        )
    return _check_int("config.num_hidden_layers", n)


def find_layer_stack(
    model: nn.Module, *, num_layers: int | None = None
) -> tuple[str, nn.ModuleList]:
    """The dotted name and the module of ``model``'s stack of transformer layers.

    The stack is the ``nn.ModuleList`` whose length is ``num_layers`` (default
    ``model.config.num_hidden_layers``): ``"encoder.layer"`` for BERT and MPNet,
    ``"model.layers"`` for ``LlamaForCausalLM``. Module lists nested inside a candidate (e.g.
    per-layer lists that happen to have the same length) are not candidates themselves.
    ValueError when no module list, or more than one (e.g. an encoder and a decoder stack),
    has that length; the message lists the module lists found.
    """
    n = _config_layer_count(model) if num_layers is None else _check_int("num_layers", num_layers)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    matching = [(name, m) for name, m in lists if len(m) == n]
    outermost = [
        (name, m)
        for name, m in matching
        if not any(
            other != name and (other == "" or name.startswith(other + ".")) for other, _ in matching
        )
    ]
    if len(outermost) == 1:
        return outermost[0]
    found = ", ".join(f"{name or '<root>'} ({len(m)})" for name, m in lists) or "none"
    if not outermost:
        raise ValueError(
            f"found no nn.ModuleList of length {n} (the number of layers) in "
            f"{type(model).__name__}; module lists found: {found}"
        )
    names = ", ".join(name or "<root>" for name, _ in outermost)
    raise ValueError(
        f"found several nn.ModuleLists of length {n} (the number of layers) in "
        f"{type(model).__name__}: {names}; cannot tell which one is the layer stack"
    )


def _kept_layers(n: int, layers: Sequence[int] | None, keep: int | None) -> list[int]:
    if layers is not None and keep is not None:
        raise ValueError("give either layers or keep, not both")
    if layers is None:
        return spread_layers(n, max(1, n // 2) if keep is None else keep)
    if isinstance(layers, (str, bytes)):
        raise ValueError(f"layers must be a sequence of ints, got {layers!r}")
    try:
        raw = list(layers)
    except TypeError:
        raise ValueError(f"layers must be a sequence of ints, got {layers!r}") from None
    if not raw:
        raise ValueError("layers must name at least one teacher layer")
    kept: list[int] = []
    for value in raw:
        j = _check_int("each entry of layers", value)
        if not 0 <= j < n:
            raise ValueError(
                f"layer {j} is out of range: the teacher has {n} layers (indices 0 to {n - 1})"
            )
        if kept and j <= kept[-1]:
            raise ValueError(
                f"layers must be strictly increasing, got {j} after {kept[-1]} in {raw}"
            )
        kept.append(j)
    return kept


def _subset_per_layer_fields(config: Any, n: int, kept: list[int]) -> dict[str, Any]:
    """Subset, in place, every top-level list field of ``config`` with ``n`` entries.

    Returns the expected new values by field name. Token-id lists and a few other known
    non-layer fields are left alone.
    """
    expected: dict[str, Any] = {}
    for key in config.to_dict():
        if key in _NOT_PER_LAYER or key.endswith(("token_id", "token_ids")):
            continue
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            subset = type(value)(value[j] for j in kept)
            try:
                setattr(config, key, subset)
            except (AttributeError, TypeError) as err:
                raise ValueError(
                    f"config field {key!r} has one entry per layer but cannot be set ({err})"
                ) from err
            expected[key] = subset
    return expected


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_")
        and k != "training"
        and (v is None or isinstance(v, (bool, int, float, str)))
    }


def _layer_attribute_differences(
    teacher_layer: nn.Module, student_layer: nn.Module, j: int, i: int
) -> list[str]:
    """Plain (None/bool/int/float/str) attributes that differ between the two layers' modules.

    An attribute holding the layer's own index (``j`` in the teacher, ``i`` in the student,
    e.g. ``layer_idx``) is expected to differ and is not reported.
    """
    diffs: list[str] = []
    t_modules = dict(teacher_layer.named_modules())
    for name, s_mod in student_layer.named_modules():
        t_mod = t_modules.get(name)
        if t_mod is None:
            continue
        t_attrs, s_attrs = _plain_attributes(t_mod), _plain_attributes(s_mod)
        for key in t_attrs.keys() & s_attrs.keys():
            t_val, s_val = t_attrs[key], s_attrs[key]
            if t_val != s_val and not (t_val == j and s_val == i):
                path = f"{name}.{key}" if name else key
                diffs.append(f"{path}: teacher {t_val!r}, student {s_val!r}")
    return diffs


def derive(
    teacher: PreTrainedModel,
    *,
    layers: Sequence[int] | None = None,
    keep: int | None = None,
) -> PreTrainedModel:
    """A shallower student of the teacher's class, initialised from the teacher (DistilBERT).

    The student keeps the teacher layers ``layers`` (0-based, strictly increasing, in range),
    or ``keep`` layers spread evenly by :func:`spread_layers` (first and last kept). Give at
    most one of the two; with neither, ``keep = max(1, n_teacher // 2)``.

    - The config is a deep copy of the teacher's with ``num_hidden_layers = len(kept)``; every
      top-level list field with one entry per teacher layer (``layer_types``,
      ``mlp_layer_types``, …) is subset the same way. Provenance is recorded as
      ``config.potstill_derived_from = {"layers": kept, "teacher_layers": n_teacher}``, a plain
      attribute that ``save_pretrained`` / ``from_pretrained`` keep (indices relative to this
      teacher: a record the teacher itself carries is replaced); ``config.dtype`` is set to
      the teacher's dtype, as ``from_pretrained`` does.
    - Weights: the layer stack is found by :func:`find_layer_stack`; teacher state-dict key
      ``{stack}.{kept[i]}.rest`` becomes the student's ``{stack}.{i}.rest``, keys outside the
      stack (embeddings, pooler, final norm, LM head, relative attention bias, …) are copied as
      they are, and the student loads them strictly (every student weight is set). Tied weights
      stay tied: the student is built by its class, which ties them, and both keys carry the
      same teacher tensor.
    - Layers are built fresh for their new positions, so per-layer indices such as Llama's
      ``layer_idx`` (used by the KV cache) run 0 … len(kept)−1. A warning lists any other plain
      attribute of a kept layer that differs from the teacher's layer (e.g. a sliding window
      chosen by an integer threshold field that the subset could not follow).
    - The student has the teacher's dtype and device (the device of its first parameter), its
      generation config, fresh trainable parameters (``requires_grad=True`` even for a frozen
      teacher) and is in eval mode, as ``from_pretrained`` returns models. The teacher is not
      modified.
    """
    from transformers import PreTrainedModel

    if not isinstance(teacher, PreTrainedModel):
        raise TypeError(
            f"teacher must be a transformers PreTrainedModel, got {type(teacher).__name__}"
        )
    n = _config_layer_count(teacher)
    kept = _kept_layers(n, layers, keep)
    stack_name, stack = find_layer_stack(teacher, num_layers=n)

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    expected = _subset_per_layer_fields(config, n, kept)
    setattr(config, DERIVED_FROM_ATTR, {"layers": list(kept), "teacher_layers": n})

    with torch.device(teacher.device):
        student = type(teacher)._from_config(config, dtype=teacher.dtype)
    for key, value in expected.items():
        if getattr(student.config, key, None) != value:
            raise ValueError(
                f"config field {key!r} has one entry per layer, but the student's config changed "
                f"it to {getattr(student.config, key, None)!r} instead of {value!r}"
            )

    prefix = f"{stack_name}." if stack_name else ""
    position = {j: i for i, j in enumerate(kept)}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in teacher.state_dict().items():
        if not key.startswith(prefix):
            state[key] = tensor
            continue
        index, _, rest = key[len(prefix) :].partition(".")
        i = position.get(int(index))
        if i is not None:
            state[f"{prefix}{i}.{rest}"] = tensor
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the teacher's weights do not fit a {len(kept)}-layer {type(teacher).__name__} "
            f"built from its config: {err}"
        ) from err

    student_stack = find_layer_stack(student)[1]
    diffs = [
        f"layer {i} (teacher {j}) {d}"
        for i, j in enumerate(kept)
        for d in _layer_attribute_differences(stack[j], student_stack[i], j, i)
    ]
    if diffs:
        warnings.warn(
            "derived student layers differ from the teacher layers they copy in: "
            + "; ".join(diffs),
            stacklevel=2,
        )

    if getattr(teacher, "generation_config", None) is not None and student.can_generate():
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()
