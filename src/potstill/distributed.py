"""Runs under ``torchrun`` (or ``accelerate launch``) on PyTorch's own distributed engine.

A launch is detected from the environment the launchers set (``WORLD_SIZE`` > 1 with ``RANK``):
the process group is created on first use (gloo for CPU tensors, NCCL for CUDA ones), every
process runs the same program, the :class:`~potstill.Distiller` splits each global batch across
the processes, and only rank 0 writes logs, checkpoints, reports and exports."""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("potstill")
T = TypeVar("T")

TIMEOUT = datetime.timedelta(hours=2)  # rank 0 evaluates and writes reports while others wait


def launched() -> bool:
    """Whether this process was started by a distributed launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` outside a distributed launch. Creates the default
    process group from the launcher's environment the first time (``POTSTILL_DIST_BACKEND``
    overrides the backend; default gloo for CPU and NCCL for CUDA tensors)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launched():
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run one process")
    backend = os.environ.get("POTSTILL_DIST_BACKEND")
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # one GPU per process on a node: NCCL's collectives and "cuda" mean cuda:LOCAL_RANK
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    # tear the group down before the interpreter exits: gloo's threads still running at exit
    # abort the process ("terminate called without an active exception")
    atexit.register(_destroy)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:  # one voice: only rank 0 logs below warnings
        logging.getLogger("potstill").setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s)", world, backend)
    return rank, world


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 outside a distributed run)."""
    return setup()[0]


def world_size() -> int:
    """The number of processes (1 outside a distributed run)."""
    return setup()[1]


def is_main() -> bool:
    """Whether this process writes files and logs: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all processes (in place; returned for chaining)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every process (``obj`` itself in a single process); picklable."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (e.g. writes files), the others after it (reading them);
    yields whether this process is rank 0."""
    main = is_main()
    if not main:
        barrier()
    try:
        yield main
    finally:
        if main:
            barrier()


def shard_blocks(module: torch.nn.Module) -> torch.nn.Module:
    """Shard ``module`` in place with FSDP2 (``fully_shard``): each block it declares in
    ``_no_split_modules`` (Hugging Face models: e.g. ``LlamaDecoderLayer``), else each top-level
    child that holds weights, then the whole module. Returns ``module``."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(module, "_no_split_modules", None) or [])
    inner = [m for m in module.modules() if type(m).__name__ in blocks]
    if not inner:
        inner = [c for c in module.children() if any(True for _ in c.parameters())]
    for m in inner:
        fully_shard(m)
    fully_shard(module)
    return module


def shard_of(n: int) -> slice:
    """This process's contiguous share of ``n`` items (the first ``n % world`` get one more)."""
    r, w = setup()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def ddp(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` under DistributedDataParallel (on its CUDA device when it has one)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def gather_full_state(sharded: torch.nn.Module, *, into: torch.nn.Module) -> torch.nn.Module:
    """The full weights of an FSDP2-sharded module loaded into its plain copy ``into`` (a
    collective: every process calls it and every process gets the whole state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict without cpu_offload: cpu_offload would leave the state on rank 0 alone
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    into.load_state_dict(full)
    return into


@contextmanager
def gradient_sync(modules: Sequence[torch.nn.Module], *, last: bool) -> Iterator[None]:
    """Gradients of ``modules`` synchronised across processes only on a step's ``last``
    micro-batch (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``); nothing to do in
    a single process."""
    if world_size() == 1:
        yield
        return
    with ExitStack() as stack:
        for module in modules:
            if hasattr(module, "no_sync") and not last:
                stack.enter_context(module.no_sync())
            elif hasattr(module, "set_requires_gradient_sync"):
                module.set_requires_gradient_sync(last)
        yield


__all__ = [
    "all_reduce_sum",
    "barrier",
    "ddp",
    "gather_full_state",
    "gradient_sync",
    "is_main",
    "launched",
    "main_first",
    "rank",
    "setup",
    "shard_blocks",
    "shard_of",
    "world_size",
]
