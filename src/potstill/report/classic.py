"""The classic run's report: ``report.md`` and a self-contained ``report.html`` (plots embedded)
built from ``results.json`` and each sub-run's ``metrics.jsonl``: teacher, student without
teacher and distilled student side by side, per setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .page import (  # noqa: E402
    describe_term,
    human_count,
    human_size,
    png_base64,
    read_metrics,
    where_it_ran,
    write_page,
)

COLUMNS = (
    "model",
    "test accuracy",
    "agreement w/ teacher",
    "parameters",
    "file size",
    "latency b=1 (ms)",
    "throughput (ex/s)",
    "retention",
    "speed-up",
)


def _rows(results: dict[str, Any], setting: dict[str, Any]) -> list[list[str]]:
    t = results["teacher"]
    models = [("teacher", t)] + [
        (label, setting["runs"][k])
        for k, label in (
            ("baseline", "student without teacher"),
            ("distilled", "student, distilled"),
        )
        if k in setting["runs"]
    ]
    rows = []
    for label, m in models:
        rows.append(
            [
                label,
                f"{100 * m['accuracy']:.2f}%",
                f"{100 * m['agreement']:.2f}%" if "agreement" in m else "—",
                human_count(m["parameters"]),
                human_size(m["file_bytes"]),
                f"{m['latency_ms']:.3f}",
                f"{m['throughput']:,.0f}",
                f"{100 * m['accuracy'] / t['accuracy']:.1f}%",
                f"{t['latency_ms'] / m['latency_ms']:.1f}×",
            ]
        )
    return rows


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One sentence per setting: the gain (or loss) of distillation over the baseline."""
    out = []
    for s in results["settings"]:
        runs = s["runs"]
        if "baseline" not in runs:
            continue
        gain = 100 * (runs["distilled"]["accuracy"] - runs["baseline"]["accuracy"])
        verdict = "helped" if gain > 0 else "did not help"
        out.append(
            f"- **{s['name']}** ({100 * s['labelled_fraction']:g}% of labels, "
            f"{s['labelled_examples']:,} labelled of {s['transfer_examples']:,}): "
            f"distillation {verdict}: {gain:+.2f} points of test accuracy "
            f"({100 * runs['baseline']['accuracy']:.2f}% → "
            f"{100 * runs['distilled']['accuracy']:.2f}%)."
        )
    return out


def plot_losses(results: dict[str, Any], run_dir: Path) -> Any:
    """Each loss term over steps, one panel per setting, log scale (their scales differ)."""
    settings = results["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 3.6), squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        for kind, run in s["runs"].items():
            # a hint stage runs first: its steps come before the main stage's on the x axis
            stages = [("hint", run["hint"], 0)] if "hint" in run else []
            stages.append((kind, run, run["hint"]["steps"] if "hint" in run else 0))
            for label, stage, offset in stages:
                rows = read_metrics(run_dir / stage["metrics"])
                terms = [
                    k
                    for k in (rows[0] if rows else {})
                    if k not in ("step", "epoch", "lr", "examples_per_s", "loss")
                ]
                for term in terms:
                    ax.plot(
                        [offset + r["step"] for r in rows],
                        [max(r[term], 1e-8) for r in rows],
                        label=f"{label}: {term}",
                        lw=1.2,
                        ls="--" if kind == "baseline" else "-",
                    )
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"loss terms — {s['name']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_tradeoffs(results: dict[str, Any]) -> Any:
    """Test accuracy against parameters and against batch-1 latency for every model."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    t = results["teacher"]
    points = [("teacher", t, "k", "*")]
    markers = {"baseline": "o", "distilled": "s"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(results["settings"]):
        for kind, m in s["runs"].items():
            points.append((f"{s['name']}: {kind}", m, colors[i % len(colors)], markers[kind]))
    for ax, key, label in (
        (axes[0], "parameters", "parameters"),
        (axes[1], "latency_ms", "latency, batch 1 (ms)"),
    ):
        for name, m, c, mk in points:
            ax.scatter(m[key], 100 * m["accuracy"], color=c, marker=mk, s=60, label=name)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def markdown(results: dict[str, Any]) -> str:
    """The report as Markdown (without plots)."""
    lines = [f"# potstill report: {results['name']}", ""]
    lines += summary_lines(results) + [""]
    for s in results["settings"]:
        lines += [
            f"## Setting `{s['name']}`: student sees {100 * s['labelled_fraction']:g}% "
            f"of the labels",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in _rows(results, s)]
        runs = s["runs"]
        stages = [(f"{k} (hint stage)", v["hint"]) for k, v in runs.items() if "hint" in v]
        stages += list(runs.items())
        lines += [
            "",
            "Training: "
            + "; ".join(
                f"{k} {v['steps']} steps on {v['examples']:,} examples in {v['train_time_s']:.1f} s"
                for k, v in stages
            )
            + ".",
            "",
        ]
    c = results.get("teacher_cache", {})
    if "live_epoch_s" in c:
        lines += [
            "## Teacher cache",
            "",
            f"Teacher logits cached once ({c['path']}, ready in {c['ready_s']:.1f} s). "
            f"Training throughput measured over {c['steps_measured']} steps each: live "
            f"teacher {c['live_examples_per_s']:,.0f} ex/s (epoch {c['live_epoch_s']:.2f} s),"
            f" cached {c['cached_examples_per_s']:,.0f} ex/s (epoch "
            f"{c['cached_epoch_s']:.2f} s): {c['speedup']:.2f}× faster.",
            "",
        ]
    t = results["teacher"]
    lines += [
        "## How these figures were made",
        "",
        f"- Data: {results['data']['name']}, {results['data']['train']:,} train / "
        f"{results['data']['val']:,} validation / {results['data']['test']:,} test; "
        f"seed {results['seed']}.",
        f"- Teacher: {t.get('source')}; objective of the distilled students: "
        + ", ".join(describe_term(o) for o in results["objective"])
        + (
            "; after a hint stage on " + ", ".join(describe_term(o) for o in hint) + "."
            if (hint := results.get("hint_objective"))
            else "."
        ),
        "- Baseline: the same student architecture and initial weights, trained on the "
        "labelled examples only with cross-entropy, for the same number of optimizer steps "
        "and batch size as the distilled student.",
        "- Accuracy is the model after its last step, on the test set (not the best "
        "validation checkpoint, which is kept beside it in `best/`).",
        f"- Speed: median of repeated forward passes, {results['threads']} threads, "
        f"torch {results['torch_version']}, Python {results['python']} on "
        f"{results['machine']}; retention = accuracy / teacher's; speed-up = teacher's "
        "latency / model's.",
        f"- {where_it_ran(results)}",
        f"- Whole run: {results['wall_time_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write(run_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """``report.md`` (with the PNG plots beside it) and a self-contained ``report.html``."""
    pngs = {
        "losses": png_base64(plot_losses(results, run_dir)),
        "tradeoffs": png_base64(plot_tradeoffs(results)),
    }
    captions = {"losses": "loss terms", "tradeoffs": "accuracy against size and latency"}
    return write_page(run_dir, results["name"], markdown(results), pngs, captions)


def console(run_dir: Path, results: dict[str, Any]) -> str:
    """What ``potstill distill`` prints: the gain of each setting and where the report is."""
    lines = [line.replace("**", "") for line in summary_lines(results)]
    lines.append(f"report: {run_dir / 'report.md'}  and  {run_dir / 'report.html'}")
    return "\n".join(lines)
