"""A fake GPU for CPU-only machines: the device ``fakegpu`` computes real values on the CPU but
refuses, as a GPU would, any operation that mixes its tensors with CPU tensors.

It is PyTorch's PrivateUse1 backend set up from Python (``torch.utils.backend_registration``,
the mechanism out-of-tree accelerators such as Ascend's ``npu`` use), renamed ``fakegpu``, with
one tensor subclass: a :class:`GPUTensor` reports the device ``fakegpu:0`` and holds a plain CPU
tensor; every operation on it (``__torch_dispatch__``, below autograd) unwraps its inputs, runs
the CPU kernel and wraps the results, after checking that no CPU tensor other than a 0-d scalar
took part (CUDA allows those too). Factory functions (``torch.zeros(..., device="fakegpu")``)
go through the two allocation kernels registered for PrivateUse1; ``.to("fakegpu")`` and
``.cpu()`` copy across. Autograd, optimizers, ``state_dict`` and ``nn.Module.to`` work on it
unchanged, so a whole training step runs "on the GPU" with the same figures as on the CPU, and
a tensor left behind on the CPU raises :class:`DeviceMismatch` naming the operation.

Importing this module sets the backend up for the whole process (once: PyTorch allows one
rename per process). Fake FakeTensorMode-CUDA tensors cannot do this: the autograd engine asks
for CUDA's device guard on the first backward and the CPU build aborts the process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

NAME = "fakegpu"
aten = torch.ops.aten


class DeviceMismatch(RuntimeError):
    """A CPU tensor (not a 0-d scalar) met a fake GPU tensor in one operation."""


class GPUTensor(torch.Tensor):
    """A tensor on the fake GPU: device ``fakegpu:0``, values held by a CPU tensor."""

    data_: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> GPUTensor:
        out = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=DEVICE,
            requires_grad=data.requires_grad,
        )
        out.data_ = data
        return out

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"GPUTensor({self.data_!r})"

    def tolist(self) -> Any:  # as on a GPU: the values, copied back (``numpy()`` refuses)
        return self.data_.tolist()

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["data_"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: Any, size: Any, stride: Any) -> GPUTensor:
        return GPUTensor(inner["data_"])

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _run(func, args, kwargs or {})


def _on_fake(device: Any) -> bool:
    return device is not None and torch.device(device).type == NAME


def _run(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    if func is aten.copy_.default:  # copies across devices are allowed, as on a GPU
        dst, src = args[0], args[1]
        src = src.data_ if isinstance(src, GPUTensor) else src
        (dst.data_ if isinstance(dst, GPUTensor) else dst).copy_(src, *args[2:])
        return dst
    if func is aten._to_copy.default and "device" in kwargs and not _on_fake(kwargs["device"]):
        return func(args[0].data_, *args[1:], **kwargs)  # to the CPU: a plain tensor
    wrappers: dict[int, GPUTensor] = {}

    def unwrap(x: Any) -> Any:
        if isinstance(x, GPUTensor):
            wrappers[id(x.data_)] = x
            return x.data_
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            raise DeviceMismatch(
                f"{func}: a {x.device} tensor of shape {tuple(x.shape)} met a {NAME} tensor"
            )
        return x

    plain_args, plain_kwargs = tree_map(unwrap, (args, kwargs))
    if _on_fake(plain_kwargs.get("device")):
        plain_kwargs["device"] = "cpu"
    out = func(*plain_args, **plain_kwargs)

    def wrap(x: Any) -> Any:
        if type(x) is torch.Tensor:
            same = wrappers.get(id(x))  # an in-place operation returns its own input
            return same if same is not None else GPUTensor(x)
        return x

    return tree_map(wrap, out)


def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):  # noqa: ANN001, ANN202
    return GPUTensor(torch.empty(size, dtype=dtype, memory_format=memory_format))


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):  # noqa: ANN001, ANN202
    return GPUTensor(torch.empty_strided(size, stride, dtype=dtype))


def _copy_from(src, dst, non_blocking=False):  # noqa: ANN001, ANN202
    # a copy onto the device below Python dispatch (``torch.tensor(..., device=...)``)
    plain = src.data_ if isinstance(src, GPUTensor) else src
    (dst.data_ if isinstance(dst, GPUTensor) else dst).copy_(plain)
    return dst


class _Backend:
    """``torch.fakegpu``: one device, always there; its random numbers are the CPU's (its
    kernels are the CPU's), so its own random state is empty (``fork_rng`` asks for it)."""

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass

    def get_rng_state(self, device: Any = None) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor, device: Any = None) -> None:
        pass


def _setup() -> None:
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    if torch._C._get_privateuse1_backend_name() == NAME:
        return
    _setup_privateuseone_for_python_backend(NAME, backend_module=_Backend())
    lib = torch.library.Library("aten", "IMPL")  # noqa: TID251
    lib.impl("empty.memory_format", _empty, "PrivateUse1")
    lib.impl("empty_strided", _empty_strided, "PrivateUse1")
    lib.impl("_copy_from", _copy_from, "PrivateUse1")
    _LIBS.append(lib)  # kept alive: the registrations go with the Library object


_LIBS: list[Any] = []
_setup()
DEVICE = torch.device(NAME, 0)


def on_fake(t: Any) -> bool:
    """Whether ``t`` is a tensor on the fake GPU."""
    return isinstance(t, torch.Tensor) and t.device.type == NAME


__all__ = ["DEVICE", "NAME", "DeviceMismatch", "GPUTensor", "on_fake"]
