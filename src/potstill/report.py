"""The run report: ``report.md`` and a self-contained ``report.html`` (plots embedded) built from
``results.json`` and each sub-run's ``metrics.jsonl``: teacher, student without teacher and
distilled student side by side."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import markdown as markdown_lib
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


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
                _count(m["parameters"]),
                _size(m["file_bytes"]),
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


def describe_term(term: dict[str, Any]) -> str:
    """A recipe term in a few words: kind, what it reads, weight and options."""
    text = term["kind"]
    if "student" in term or "teacher" in term:
        text += f" {term.get('student', 'logits')}→{term.get('teacher', 'logits')}"
    opts = [f"weight {term.get('weight', 1.0)}"]
    if "temperature" in term:
        opts.append(f"T={term['temperature']}")
    for key in ("beta", "skew", "loss", "layer_map", "p", "relation_heads"):
        if key in term:
            opts.append(f"{key} {term[key]}")
    return f"{text} ({', '.join(opts)})"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Training rows (not evaluation rows) of a metrics.jsonl file."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval" not in r]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


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


def plot_metric_curves(curves: dict[str, Path], key: str, title: str) -> str:
    """One line per run of ``key`` over optimizer steps (training rows of each metrics.jsonl),
    log scale; returns the PNG as base64."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, path in curves.items():
        rows = [r for r in read_metrics(path) if key in r]
        ax.plot([r["step"] for r in rows], [max(r[key], 1e-8) for r in rows], label=label, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def html_page(title: str, md: str, pngs: dict[str, str]) -> str:
    """A self-contained HTML page: the Markdown ``md`` rendered, then the base64 PNGs."""
    body = markdown_lib.markdown(md, extensions=["tables"])
    imgs = "".join(f'<img alt="{n}" src="data:image/png;base64,{d}">' for n, d in pngs.items())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>"
        f"{html.escape(title)} — potstill report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;display:block;margin:1em 0}code{background:#f3f3f3}</style>"
        f"</head><body>{body}{imgs}</body></html>"
    )


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
        f"- Whole run: {results['wall_time_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` (with PNG plots beside it) and a self-contained ``report.html``."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a finished potstill run")
    results = json.loads(path.read_text())
    md = markdown(results)
    pngs = {
        "losses": _png(plot_losses(results, run_dir)),
        "tradeoffs": _png(plot_tradeoffs(results)),
    }
    for name, data in pngs.items():
        (run_dir / f"{name}.png").write_bytes(base64.b64decode(data))
    md_full = (
        md + "\n![loss terms](losses.png)\n\n![accuracy against size and latency](tradeoffs.png)\n"
    )
    (run_dir / "report.md").write_text(md_full)
    page = html_page(results["name"], md, pngs)
    (run_dir / "report.html").write_text(page)
    return run_dir / "report.md", run_dir / "report.html"
