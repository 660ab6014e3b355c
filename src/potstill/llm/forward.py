"""Training and scoring forwards of a Hugging Face causal LM on a tokenized batch: full
next-token logits (packed rows get a block-diagonal causal mask), or the last hidden state and
the LM head, for a head fused with the token divergences."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..signal import StudentView


def causal_lm_forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Next-token logits ``(B, T, V)`` of a Hugging Face causal LM on a tokenized batch. A packed
    batch (with ``segment`` and ``position_ids``, see :func:`potstill.llm.data.pack_examples`)
    gets a block-diagonal causal mask, so packed examples never attend to each other."""
    # use_cache=False: a training or scoring pass has no use for the key/value cache
    return model(**_forward_kwargs(batch), use_cache=False).logits


def _forward_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    if "segment" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": packed_attention(batch["segment"]),
        "position_ids": batch["position_ids"],
    }


def fused_head_problem(model: nn.Module) -> str | None:
    """Why :func:`causal_lm_hidden_forward` cannot serve ``model`` (None when it can): its
    logits must be exactly ``lm_head(last hidden state)`` of a plain linear head."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "the student is under DDP (torchrun), whose forward must run whole"
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if type(head) is not nn.Linear:
        return f"its output layer is {type(head).__name__}, not a plain nn.Linear"
    if getattr(model, "base_model", model) is model:
        return "it has no separate base model (Hugging Face base_model) to run without the head"
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return f"its config sets {attr} = {value}: its logits are not the head's output"
    return None


def causal_lm_hidden_forward(model: nn.Module, batch: Mapping[str, Any]) -> StudentView:
    """The student's forward for training with a fused output layer: the base model's last
    hidden state ``(B, T, H)`` and the LM head, as a :class:`~potstill.signal.StudentView` whose
    logits are deferred. Token terms then compute their divergence chunk by chunk through the
    head (:func:`~potstill.losses.fused.fused_linear_divergence`): neither the student's
    ``(B, T, V)`` logits nor their gradient ever exist whole. Any other term that reads
    ``view.logits`` builds them. Refused (:func:`fused_head_problem`) for heads with logit
    scaling or soft-capping and under DDP."""
    problem = fused_head_problem(model)
    if problem is not None:
        raise ValueError(f"fused_head: {problem}; set fused_head: false")
    hidden = model.base_model(**_forward_kwargs(batch), use_cache=False).last_hidden_state
    return StudentView(hidden=hidden, head=model.get_output_embeddings())


def packed_attention(segment: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T, T)`` boolean mask from segment ids ``(B, T)`` (0 = padding): a position sees
    the earlier positions of its own segment; padding sees only itself (no empty rows)."""
    T = segment.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=segment.device))
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    real = (segment > 0).unsqueeze(2) | torch.eye(T, dtype=torch.bool, device=segment.device)
    return (same & causal & real).unsqueeze(1)
