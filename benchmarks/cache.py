"""The teacher-signal cache on the SmolLM2 recipe: bytes per token, fidelity, and training
throughput with the cache against the live teacher, measured in one run.

Setup: the built-in ``smollm2-fortunes`` recipe (teacher SmolLM2-135M-Instruct, fortunes as chat
answers, max_length 96, batches of 8 sequences), the first ``--examples`` of its training data.

* **Bytes per token**: a cache of those examples is written with :func:`potstill.cache.write_cache`
  (the real writer: shards, manifest, records) for each k in ``--ks`` and each encoding; the
  figure is the shards' bytes on disk over the number of stored token positions (every real
  token of every example, prompt included). Manifest and part records (a few kB) are left out.
* **Fidelity**: for each k, over the positions the training loss reads (response tokens), the
  mean KL(dense teacher ‖ cached teacher) at temperature 1, where the cached distribution is the
  stored top-k log-probabilities with the tail mass spread evenly over the other V − k tokens
  (what a top-k cache can say about the rest of the vocabulary); the KL on the k + 1 buckets the
  sparse losses use (top-k tokens + one tail bucket), which isolates the encoding's rounding from
  the truncation to k tokens; and the teacher's mean probability mass inside its top-k.
* **Throughput**: the recipe's student (10 of the teacher's 30 layers, weights copied), forward KL,
  AdamW, chunk size 1024, trained by the same :class:`potstill.Distiller` for ``--steps`` steps
  from the live teacher and from the k = 64 default cache, alternately (live, cached, live, …)
  for ``--rounds`` rounds after one warm-up round; tokens/s = real tokens of the batches over
  the Distiller's own training time. The figure is the median over rounds of the per-round
  ratio cached / live (spread shown). Goal ≥ 1.4×.

    .venv/bin/python benchmarks/cache.py                      # about 6 minutes on 2 cores
    .venv/bin/python benchmarks/cache.py --examples 64 --rounds 2 --steps 2   # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from potstill import Distiller
from potstill.cache import CachedTeacher, Encoding, cache_status, write_cache
from potstill.data.tensors import TensorDictDataset
from potstill.llm.forward import causal_lm_forward
from potstill.losses.objective import Objective
from potstill.losses.terms import token_term
from potstill.losses.tokens import batch_token_mask
from potstill.recipe import load_recipe
from potstill.runs.lm_data import lm_datasets, load_lm_teacher
from potstill.students import derive
from potstill.teachers import LiveTeacher

ENCODINGS = {
    "q8 + zlib (default)": Encoding(logprobs="q8", compression="zlib"),
    "q8, fixed width": Encoding(logprobs="q8", compression="none"),
    "float16, fixed width": Encoding(logprobs="float16", compression="none"),
}


def _subset(ds: TensorDictDataset, n: int) -> TensorDictDataset:
    return TensorDictDataset({k: v[:n] for k, v in ds.tensors.items()}, trim_by=ds.trim_by)


@torch.no_grad()
def fidelity(teacher, data: TensorDictDataset, cached: CachedTeacher, batch_size: int) -> dict:
    """Mean KL(dense ‖ cached, tail spread evenly) and KL on the k+1 buckets, over loss
    positions."""
    live = LiveTeacher(teacher, forward=causal_lm_forward)
    spread, buckets, mass, count = 0.0, 0.0, 0.0, 0
    for lo in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(lo, min(lo + batch_size, len(data))))
        mask = batch_token_mask(batch)
        logp = F.log_softmax(live.signal(batch).logits[mask].double(), dim=-1)
        topk = cached.signal(batch).topk
        ids, lq, tail = topk.ids[mask], topk.logprobs[mask].double(), topk.tail_mass[mask].double()
        V, k = logp.shape[-1], ids.shape[-1]
        p = logp.exp()
        # cached distribution over the vocabulary: top-k as stored, the tail spread evenly
        lq_full = (tail / (V - k)).clamp_min(1e-300).log().unsqueeze(-1).expand_as(logp).clone()
        lq_full.scatter_(-1, ids, lq)
        spread += float((p * (logp - lq_full)).sum())
        p_top = p.gather(-1, ids)
        p_tail = (1 - p_top.sum(-1)).clamp_min(0)
        kl_top = (p_top * (p_top.clamp_min(1e-300).log() - lq)).sum(-1)
        kl_tail = p_tail * (p_tail.clamp_min(1e-300).log() - tail.clamp_min(1e-300).log())
        buckets += float((kl_top + kl_tail).sum())
        mass += float(p_top.sum())
        count += int(mask.sum())
    return {
        "kl_spread": spread / count,
        "kl_buckets": buckets / count,
        "topk_mass": mass / count,
        "positions": count,
    }


def throughput(teacher, student, data, cached, args) -> dict:
    """Tokens/s of Distiller training, live vs cached, alternating rounds."""
    recipe = args.recipe
    cfg = recipe.train.model_copy(
        update={"max_steps": args.steps, "progress": False, "log_every": 10**6}
    )
    objective = Objective([token_term("fkl", chunk_size=recipe.chunk_size)])
    live = LiveTeacher(teacher, forward=causal_lm_forward)
    rates: dict[str, list[float]] = {"live": [], "cached": []}
    for r in range(args.rounds + 1):
        for name, source in (("live", live), ("cached", cached)):
            fit = Distiller(
                copy.deepcopy(student), objective, data, teacher=source, config=cfg,
                student_forward=causal_lm_forward, name=name,
            ).fit()  # fmt: skip
            seen = fit.examples_seen
            # real tokens of the examples it trained on (the same batches for both sources)
            tokens = seen / len(data) * int(data.tensors["attention_mask"].sum())
            if r > 0:  # round 0 warms up
                rates[name].append(tokens / fit.train_time_s)
            print(f"  round {r} {name}: {tokens / fit.train_time_s:,.0f} tokens/s "
                  f"({fit.train_time_s / fit.steps:.2f} s/step)", flush=True)  # fmt: skip
    ratios = [c / li for c, li in zip(rates["cached"], rates["live"], strict=True)]
    return {
        "live_tokens_per_s": statistics.median(rates["live"]),
        "cached_tokens_per_s": statistics.median(rates["cached"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256, help="training examples cached")
    parser.add_argument("--ks", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.recipe = load_recipe("smollm2-fortunes")
    t0 = time.perf_counter()
    teacher, tok = load_lm_teacher(args.recipe)
    train, _, _ = lm_datasets(args.recipe, tok)
    data = _subset(train, args.examples)
    real_tokens = int(data.tensors["attention_mask"].sum())
    print(f"{len(data)} examples, {real_tokens:,} real tokens, V = {len(tok):,}", flush=True)
    results: dict = {"examples": len(data), "tokens": real_tokens, "sizes": {}, "fidelity": {}}
    with tempfile.TemporaryDirectory(prefix="potstill-cache-bench-") as tmp:
        default_cache = None
        for k in args.ks:
            for name, enc in ENCODINGS.items():
                if name != "q8 + zlib (default)" and k != args.ks[-1]:
                    continue  # the other encodings at the largest k only
                path = Path(tmp) / f"k{k}-{enc.logprobs}-{enc.compression}"
                t = time.perf_counter()
                write_cache(
                    teacher, data, path, unit="token", k=k, encoding=enc,
                    forward=causal_lm_forward, tokenizer=tok, progress=False,
                )  # fmt: skip
                st = cache_status(path)
                row = {
                    "k": k, "encoding": name, "bytes": st.bytes, "positions": st.positions,
                    "bytes_per_token": st.bytes / st.positions,
                    "write_tokens_per_s": st.positions / (time.perf_counter() - t),
                }  # fmt: skip
                results["sizes"][f"{k} {name}"] = row
                print(f"k={k} {name}: {row['bytes_per_token']:.1f} bytes/token", flush=True)
                if name == "q8 + zlib (default)":
                    cached = CachedTeacher(path)
                    fid = fidelity(teacher, data, cached, 8)
                    results["fidelity"][str(k)] = fid
                    print(
                        f"  KL spread {fid['kl_spread']:.4f}, buckets {fid['kl_buckets']:.2e}, "
                        f"top-k mass {fid['topk_mass']:.3f}"
                    )
                    if k == 64:
                        default_cache = cached
        torch.manual_seed(args.recipe.seed)
        student = derive(teacher, keep=args.recipe.student.keep)
        assert default_cache is not None, "--ks must include 64 for the throughput figure"
        results["throughput"] = throughput(teacher, student, data, default_cache, args)
    results["wall_s"] = time.perf_counter() - t0
    results["threads"] = torch.get_num_threads()
    tp = results["throughput"]
    print(
        "\n| k | encoding | bytes per token | teacher mass in top-k | KL(dense ‖ cached) "
        "| KL on k+1 buckets |"
    )
    print("|---|---|---|---|---|---|")
    for row in results["sizes"].values():
        fid = results["fidelity"].get(str(row["k"])) if "default" in row["encoding"] else None
        kl = (
            f"{fid['topk_mass']:.3f} | {fid['kl_spread']:.3f} | {fid['kl_buckets']:.1e}"
            if fid
            else "— | — | —"
        )
        print(f"| {row['k']} | {row['encoding']} | {row['bytes_per_token']:.1f} | {kl} |")
    print(
        f"\nTraining (10-layer student, fkl, AdamW, batch 8): live {tp['live_tokens_per_s']:,.0f} "
        f"tokens/s, cached (k = 64) {tp['cached_tokens_per_s']:,.0f} tokens/s: "
        f"{tp['ratio']:.2f}× (rounds {tp['ratio_min']:.2f}–{tp['ratio_max']:.2f}; goal ≥ 1.4×). "
        f"Wall time {results['wall_s'] / 60:.1f} min, {results['threads']} threads."
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    assert math.isfinite(tp["ratio"])


if __name__ == "__main__":
    main()
