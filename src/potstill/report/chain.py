"""The chain run's report: every model of the chain side by side with the change each step
made (classic: test accuracy; causal-LM: every model measured against the first teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .page import write_page


def lm_chain_markdown(results: dict[str, Any]) -> str:
    """An LLM chain's report: every model measured against the first teacher, and the change
    in held-out perplexity from the model that taught it."""
    lines = [
        f"# potstill chain report: {results['name']}",
        "",
        f"Stages in order: {', '.join(results['stages'])}; each stage's teacher is the previous "
        f"stage's distilled student (variant {results['setting']}); 'direct' (when present) "
        "learns from the first teacher. Every model measured here in one pass on the held-out "
        "data: perplexity of the data's responses, top-1 agreement and KL(teacher‖model) with "
        "the first teacher. 'vs its teacher': the perplexity divided by its teacher's. Whole "
        f"chain {results['wall_time_s'] / 60:.1f} min.",
        "",
        "| model | taught by | layers | parameters | perplexity | vs its teacher | top-1 "
        "agreement | KL (nats) | forward tokens/s | steps | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ppl = {r["model"]: r["perplexity"] for r in results["rows"]}
    for r in results["rows"]:
        by = r["taught_by"]
        change = f"×{r['perplexity'] / ppl[by]:.2f}" if by in ppl else "—"
        steps = "—" if r.get("steps") is None else str(r["steps"])
        time_s = "—" if r.get("train_time_s") is None else f"{r['train_time_s']:.0f}"
        lines.append(
            f"| {r['model']} | {by} | {r['layers']} | {r['parameters'] / 1e6:.1f}M | "
            f"{r['perplexity']:,.1f} | {change} | {r['top1_agreement']:.3f} | "
            f"{r['kl_to_teacher']:.3f} | {r['forward_tokens_per_s']:,.0f} | {steps} | {time_s} |"
        )
    return "\n".join(lines) + "\n"


def chain_markdown(results: dict[str, Any]) -> str:
    """The chain's report: every model side by side, and the change of each step."""
    lines = [
        f"# potstill chain report: {results['name']}",
        "",
        f"Stages in order: {', '.join(results['stages'])}; each stage's teacher is the previous "
        f"stage's distilled student (setting {results['setting']}); 'direct' (when present) "
        "learns from the first teacher, 'ensemble' from the mean of all generations. Test "
        "accuracy; latency at batch 1, throughput at the recipe's batch. Whole chain "
        f"{results['wall_time_s'] / 60:.1f} min.",
        "",
        "| model | parameters | test accuracy | change from its teacher | latency (ms) | "
        "throughput (ex/s) |",
        "|---|---|---|---|---|---|",
    ]
    teacher = previous = results["rows"][0]["accuracy"]
    for row in results["rows"]:
        change = "—"
        if row["model"].endswith("(distilled)"):
            # a chained stage learned from the stage before it; 'direct' from the first
            # teacher; 'ensemble' from all generations (compared with the last one)
            source = teacher if row["stage"] == "direct" else previous
            change = f"{100 * (row['accuracy'] - source):+.2f} points"
            if row["stage"] not in ("direct", "ensemble"):
                previous = row["accuracy"]
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {100 * row['accuracy']:.2f}% | {change} "
            f"| {row['latency_ms']:.3f} | {row['throughput']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def write(run_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """report.md and the same as a self-contained report.html."""
    causal_lm = results.get("base_kind") == "causal-lm"
    md = lm_chain_markdown(results) if causal_lm else chain_markdown(results)
    return write_page(run_dir, results["name"], md, {}, {})


def console(run_dir: Path, results: dict[str, Any]) -> str:
    """What ``potstill distill`` prints: the report."""
    return (run_dir / "report.md").read_text()
