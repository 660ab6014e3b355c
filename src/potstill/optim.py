"""The optimizer and learning-rate schedule of a training run: AdamW / Adam / SGD with weight
decay on matrices only (fused kernels where every parameter allows), and linear warm-up then
constant, linear or cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .config import TrainConfig


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer; weight decay applies to matrices and kernels, not biases or norms."""
    o = cfg.optimizer
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    fused = o.fused
    if fused is None:  # one kernel per parameter instead of a dozen tensor ops: ~5× faster
        fused = bool(params) and all(
            p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
        )
    return cls(groups, lr=o.lr, betas=o.betas, fused=fused or None)


def _lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The schedule's factor of the base learning rate at each optimizer step (for LambdaLR)."""
    s = cfg.schedule
    warmup = s.warmup_steps or int(s.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if s.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 1.0 - progress if s.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * shape

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's learning-rate schedule over ``total_steps`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
