"""The embedding run's report: every model against the teacher on held-out texts (neighbours,
similarity ranks, linear-map cosine), with size and measured speed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .page import where_it_ran, write_page


def embed_markdown(results: dict[str, Any]) -> str:
    """The embedding run's report as Markdown."""
    cols = (
        "model",
        "layers × hidden",
        "parameters",
        "neighbours@10",
        "similarity ρ",
        "cosine (linear map)",
        "latency b=1 (ms)",
        "throughput (texts/s)",
    )
    lines = [
        f"# potstill report: {results['name']}",
        "",
        f"Teacher `{results['teacher']}`; students from `{results['student']}` "
        f"(layers kept: {results['derived_layers']}). Held-out: {results['data']['val']} "
        f"fortunes texts; training: {results['data']['train']} texts, "
        f"{results['data']['max_length']} tokens at most. Seed {results['seed']}.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for name, r in results["rows"].items():
        lines.append(
            f"| {name} | {r['layers']} × {r['hidden_size']} | {r['parameters'] / 1e6:.1f}M | "
            f"{r['neighbour_agreement@10']:.3f} | {r['similarity_spearman']:.3f} | "
            f"{r['linear_map_cosine']:.3f} | {r['latency_ms']:.1f} | {r['throughput']:.0f} |"
        )
    if any("pairs_spearman" in r for r in results["rows"].values()):
        lines += ["", "Scored pairs (Spearman of cosine similarity against the pairs' scores): "
                  + ", ".join(f"{name} {r['pairs_spearman']:.3f}"
                              for name, r in results["rows"].items()) + "."]  # fmt: skip
    lines += [
        "",
        "neighbours@10: mean overlap of each held-out text's 10 nearest neighbours under "
        "student and teacher; similarity ρ: Spearman correlation of all pairwise cosine "
        "similarities; cosine (linear map): mean cosine to the teacher's embedding after the "
        "least-squares linear map fitted on the training texts (same for every model). "
        f"Teacher pass (once, reused by every objective): {results['teacher_pass_s']:.0f} s."
        f" Whole run {results['wall_time_s']:.0f} s, {results['threads']} threads. "
        + where_it_ran(results),
        "",
    ]
    return "\n".join(lines)


def write(run_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """report.md and the same as a self-contained report.html."""
    return write_page(run_dir, results["name"], embed_markdown(results), {}, {})


def console(run_dir: Path, results: dict[str, Any]) -> str:
    """What ``potstill distill`` prints: the report."""
    return (run_dir / "report.md").read_text()
