"""Evidence for a causal LM against its teacher: held-out perplexity, top-1 next-token agreement,
mean per-token KL to the teacher, greedy generations side by side, and measured tokens/s; for
answers to held-out prompts, the teacher's log-likelihood of them, ROUGE-L against the
teacher's own answers, and their length."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.tensors import iterate_batches, make_batch
from ..evaluate import eval_mode, median_seconds, synced
from ..losses.divergences import divergence
from ..losses.forms import shared_vocabulary
from ..losses.tokens import batch_token_mask, next_token_mask, next_token_nll
from ..placement import model_device, on_device
from ..progress import Progress
from .data import right_pad
from .forward import causal_lm_forward


@torch.no_grad()
def lm_figures(
    models: Mapping[str, nn.Module],
    data: Dataset,
    *,
    teacher: nn.Module | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Held-out figures of each model in one pass over ``data`` (the teacher runs once a batch).

    For every model: ``nll`` (mean next-token negative log-likelihood of the response tokens,
    in nats) and ``perplexity = exp(nll)``; with a ``teacher``, also ``top1_agreement`` (share
    of those positions where the model's most likely next token is the teacher's) and
    ``kl_to_teacher`` (mean per-token KL(teacher ‖ model), nats, temperature 1, over the shared
    vocabulary). ``tokens`` is the number of positions scored.
    """
    sums = {name: {"nll": 0.0, "agree": 0.0, "kl": 0.0} for name in models}
    count = 0
    states = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    if teacher is not None:
        teacher.eval()
    n = len(data)
    batches = iterate_batches(data, torch.arange(n), batch_size)
    bar = Progress(math.ceil(n / batch_size), "evaluating", "batch", enabled=progress)
    try:
        for batch in batches:
            bar.update(1)
            mask = batch_token_mask(batch)
            k = int(mask.sum())
            count += k
            t_logits = None
            if teacher is not None:  # on the teacher's device; compared on each model's
                t_batch = on_device(batch, model_device(teacher))
                t_logits = causal_lm_forward(teacher, t_batch).float()
            for name, model in models.items():
                device = model_device(model)
                here, m_mask = on_device(batch, device), mask.to(device)
                logits = causal_lm_forward(model, here).float()
                nll, _ = next_token_nll(logits, here["input_ids"], m_mask)
                sums[name]["nll"] += float(nll)
                if t_logits is None:
                    continue
                s, t = shared_vocabulary(logits, t_logits.to(device))
                same = s.argmax(-1) == t.argmax(-1)
                sums[name]["agree"] += float(same[m_mask].sum())
                sums[name]["kl"] += float(divergence(s, t, "fkl", mask=m_mask)) * k
    finally:
        bar.close()
        for name, m in models.items():
            m.train(states[name])
    out: dict[str, dict[str, float]] = {}
    for name, s in sums.items():
        nll = s["nll"] / max(count, 1)
        row = {"nll": nll, "perplexity": math.exp(nll), "tokens": float(count)}
        if teacher is not None:
            row["top1_agreement"] = s["agree"] / max(count, 1)
            row["kl_to_teacher"] = s["kl"] / max(count, 1)
        out[name] = row
    return out


@torch.no_grad()
def greedy_generations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 40,
) -> tuple[list[str], float]:
    """Greedy continuations of each prompt (token ids, batch 1) and the measured decoding speed
    in new tokens per second over all prompts. Generation stops at the model's EOS."""
    model.eval()
    texts, new_tokens, seconds = [], 0, 0.0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for ids in prompts:
        x = torch.tensor([list(ids)], device=model_device(model))
        start = time.perf_counter()
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        seconds += time.perf_counter() - start
        new = out[0, x.shape[1] :]
        new_tokens += len(new)
        texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts, new_tokens / max(seconds, 1e-9)


@torch.no_grad()
def forward_tokens_per_s(
    model: nn.Module, data: Dataset, batch_size: int = 8, repeats: int = 3
) -> float:
    """Tokens per second of a forward pass over the first ``batch_size`` examples of ``data``
    (real tokens only; median of ``repeats`` after one warm-up)."""
    model.eval()
    batch = on_device(make_batch(data, torch.arange(min(batch_size, len(data)))),
                      model_device(model))  # fmt: skip
    tokens = int(batch["attention_mask"].sum())
    run = lambda: synced(causal_lm_forward(model, batch))  # noqa: E731
    return tokens / median_seconds(run, repeats, warmup=1)


@torch.no_grad()
def answer_tokens(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | None,
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[list[int]]:
    """Greedy answers (token ids, the end token kept when the model stopped) to each prompt."""
    from .answers import sample_completions

    answers: list[list[int]] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[lo : lo + batch_size]]
        for new in sample_completions(
            model, chunk, pad_token_id=pad_token_id, max_new_tokens=max_new_tokens
        ):
            if eos_token_id is not None and eos_token_id in new:
                new = new[: new.index(eos_token_id) + 1]
            answers.append(new)
    return answers


@torch.no_grad()
def teacher_log_likelihood(
    teacher: nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 8,
) -> tuple[float, int]:
    """``(mean log-probability per answer token, token count)`` of ``answers`` under
    ``teacher``, each given its prompt: how likely the teacher finds what a model wrote."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    total, count = 0.0, 0
    with eval_mode(teacher):
        for lo in range(0, len(prompts), batch_size):
            heads = prompts[lo : lo + batch_size]
            tails = answers[lo : lo + batch_size]
            rows = [list(p) + list(a) for p, a in zip(heads, tails, strict=True)]
            ids, mask = right_pad(rows, pad_token_id)
            device = model_device(teacher)
            ids, mask = ids.to(device), mask.to(device)
            logits = causal_lm_forward(teacher, {"input_ids": ids, "attention_mask": mask})
            lengths = torch.tensor([len(p) for p in heads], device=device)
            scored = next_token_mask(mask, prompt_lengths=lengths)
            nll, n = next_token_nll(logits.float(), ids, scored)
            total -= float(nll)
            count += int(n)
    return total / max(count, 1), count


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of ``predictions`` against ``references`` (rouge-score, no stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # an optional dependency of the LLM tools
        raise ImportError("ROUGE-L needs rouge-score: pip install 'potstill[hf]'") from e
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]
    return sum(scores) / max(len(scores), 1)
