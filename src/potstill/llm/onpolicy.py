"""On-policy distillation (GKD, Agarwal et al. 2024): with probability λ a training batch's
responses are replaced by completions the current student samples for its prompts; the teacher
then scores those tokens and the divergence is taken on them. λ = 0 is supervised distillation
on the given responses, λ = 1 fully on-policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .answers import sample_completions
from .data import right_pad


@dataclass(frozen=True)
class SamplingSpec:
    """How the student samples its completions: ``temperature`` 0 is greedy."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0


class OnPolicySampler:
    """A ``Distiller`` batch transform: with probability ``lam`` (drawn per micro-batch from a
    stream seeded by ``seed`` and the micro-batch number, so resumed runs draw the same), the
    batch's responses become the student's own completions of its prompts, sampled with the
    student's current weights (in eval mode, without gradients). The returned batch keeps
    ``prompt_length`` and is right-padded; ``on_policy`` says which kind it is.

    Batches carry ``input_ids``, ``attention_mask`` (right padding) and ``prompt_length``.
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        lam: float,
        pad_token_id: int,
        eos_token_id: int | None,
        sampling: SamplingSpec | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"on_policy (λ) must lie in [0, 1], got {lam}")
        self.student = student
        self.lam = lam
        self.pad = pad_token_id
        self.eos = eos_token_id
        self.sampling = sampling or SamplingSpec()
        self.seed = seed
        self.sampled_batches = 0

    def __call__(self, batch: dict[str, Any], micro: int) -> dict[str, Any]:
        """``batch`` with the student's completions, or unchanged (see the class doc)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + micro)
        if self.lam == 0 or float(torch.rand((), generator=g)) >= self.lam:
            return {**batch, "on_policy": False}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=g)))
            out = self._complete(batch)
        self.sampled_batches += 1
        return out

    @torch.no_grad()
    def _complete(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids, lengths = batch["input_ids"], batch["prompt_length"]
        prompts = [ids[b, : int(n)].tolist() for b, n in enumerate(lengths)]
        s = self.sampling
        generated = sample_completions(
            self.student, prompts, pad_token_id=self.pad, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, top_p=s.top_p,
        )  # fmt: skip
        rows = []
        for prompt, new in zip(prompts, generated, strict=True):
            if self.eos is not None and self.eos in new:
                new = new[: new.index(self.eos) + 1]  # the end token is a target too
            rows.append(prompt + new)
        input_ids, attention = right_pad(rows, self.pad, dtype=ids.dtype)
        return {
            **batch,
            "input_ids": input_ids.to(ids.device),  # where the batch was placed
            "attention_mask": attention.to(ids.device),
            "on_policy": True,
        }


__all__ = ["OnPolicySampler", "SamplingSpec"]
