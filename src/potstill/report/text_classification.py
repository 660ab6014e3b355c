"""The text-classification run's report: teacher, distilled student and the same student
without a teacher on the test split (accuracy, macro-F1, agreement, size, measured speed), the
share of the teacher's accuracy each keeps, per-class F1, and what the data lost on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .page import describe_term, human_size, where_it_ran, write_page


def markdown(results: dict[str, Any]) -> str:
    """The run's report as Markdown."""
    rows, data = results["rows"], results["data"]
    t = rows["teacher"]
    cols = (
        "model", "layers", "parameters", "size", "accuracy", "macro-F1", "of teacher's accuracy",
        "agreement", "latency b=1 (ms)", "throughput (texts/s)", "speed-up",
    )  # fmt: skip
    split_rows = data["rows"]
    lines = [
        f"# potstill report: {results['name']}",
        "",
        f"Teacher `{results['teacher']}` ({t.get('source', '')}); student: {results['student']}"
        + (f" (kept {results['derived_layers']['layers']})" if results.get("derived_layers")
           else "")
        + f". Data: {data['source']}, {len(data['classes'])} classes, "
        f"{split_rows['train']:,} / {split_rows['validation']:,} / {split_rows['test']:,} "
        f"train / validation / test texts, {data['max_length']} tokens at most. "
        f"Objective: {', '.join(describe_term(o) for o in results['objective'])}. "
        f"Seed {results['seed']}.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]  # fmt: skip
    for name, r in rows.items():
        agreement = f"{100 * r['agreement']:.1f}%" if "agreement" in r else "—"
        lines.append(
            f"| {name} | {r['layers']} | {r['parameters'] / 1e6:.1f}M | "
            f"{human_size(r['file_bytes'])} | {100 * r['accuracy']:.2f}% | "
            f"{100 * r['macro_f1']:.2f}% | {100 * r['accuracy'] / t['accuracy']:.1f}% | "
            f"{agreement} | {r['latency_ms']:.1f} | {r['throughput']:.0f} | "
            f"{r['throughput'] / t['throughput']:.2f}× |"
        )
    yours = sorted({m for r in rows.values() for m in r.get("metrics_yours", {})})
    if yours:
        lines += [
            "",
            "Your metrics on the test split:",
            "",
            "| model | " + " | ".join(yours) + " |",
            "|" + "---|" * (len(yours) + 1),
        ]
        for name, r in rows.items():
            cells = " | ".join(f"{r['metrics_yours'][m]:.4g}" for m in yours)
            lines.append(f"| {name} | {cells} |")  # fmt: skip
    lines += ["", _verdict(rows), "", "Per-class F1 on the test split:", ""]
    names = list(rows)
    lines += ["| class | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for c in data["classes"]:
        cells = " | ".join(f"{100 * rows[n]['per_class_f1'][c]:.1f}" for n in names)
        lines.append(f"| {c} | {cells} |")
    lost = {k: v for k, v in data["left_out"].items() if v}
    cut = {k: sum(v.values()) for k, v in data["cut"].items() if sum(v.values())}
    lines += [
        "",
        "Rows left out (label not among the classes): "
        + (", ".join(f"{k} {v:,}" for k, v in lost.items()) if lost else "none")
        + f". Texts cut at {data['max_length']} tokens: "
        + (", ".join(f"{k} {v:,}" for k, v in cut.items()) if cut else "none")
        + f". Columns: {data['columns']}. Speed: median forward time on this machine "
        f"({results['threads']} threads); whole run {results['wall_time_s']:.0f} s. "
        + where_it_ran(results),
        "",
    ]
    return "\n".join(lines)


def _verdict(rows: dict[str, Any]) -> str:
    d, b = rows.get("distilled"), rows.get("baseline")
    if d is None or b is None:
        return ""
    gain = 100 * (d["accuracy"] - b["accuracy"])
    word = "beat" if gain > 0 else "did not beat"
    return (
        f"The distilled student {word} the same student trained without a teacher at the same "
        f"budget: {gain:+.2f} accuracy points, {100 * (d['macro_f1'] - b['macro_f1']):+.2f} "
        "macro-F1 points (one seed)."
    )


def write(run_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """report.md and the same as a self-contained report.html."""
    return write_page(run_dir, results["name"], markdown(results), {}, {})


def console(run_dir: Path, results: dict[str, Any]) -> str:
    """What ``potstill distill`` prints: the report."""
    return (run_dir / "report.md").read_text()
