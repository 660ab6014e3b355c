"""What every report page shares: a term in a few words, training rows of a metrics log, loss
curves as an embedded PNG, sizes and counts for humans, and the self-contained HTML page beside
report.md."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any

import markdown as markdown_lib
import matplotlib

from ..io import atomic_write_text
from ..logs import read_metrics_lines

log = logging.getLogger("potstill")

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def where_it_ran(results: dict[str, Any]) -> str:
    """Where a run computed, in a sentence: the device (a GPU's name and memory), the
    teacher's device when it differs, the precision, and each trained part's peak GPU memory."""
    device = results.get("device", "cpu")
    if results.get("device_name"):
        text = (f"Computed on {results['device_name']} ({device}, "
                f"{results.get('device_memory_gb', '?')} GiB)")  # fmt: skip
    elif device == "cpu":
        text = f"Computed on the CPU ({results.get('threads', '?')} threads)"
    else:
        text = f"Computed on {device}"
    teacher = results.get("teacher_device")
    if teacher and teacher != device:
        text += f", the teacher on {teacher}"
    if results.get("precision"):
        text += f", precision {results['precision']}"
    peaks = _peaks(results)
    if peaks:
        text += "; peak GPU memory " + ", ".join(f"{k} {v:.2f} GiB" for k, v in peaks.items())
    return text + "."


_CONTAINERS = frozenset({"settings", "runs", "rows", "stages", "results"})


def _peaks(node: Any, path: str = "") -> dict[str, float]:
    """Every ``peak_memory_gb`` in the results, by the path of the part that recorded it
    (list items by their ``name``)."""
    out: dict[str, float] = {}
    items: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        if isinstance(node.get("peak_memory_gb"), int | float):
            out[path or "run"] = float(node["peak_memory_gb"])
        items = [(str(k), v) for k, v in node.items()]
    elif isinstance(node, list):
        items = [(str(v.get("name", i)) if isinstance(v, dict) else str(i), v)
                 for i, v in enumerate(node)]  # fmt: skip
    for label, value in items:
        if label in _CONTAINERS:  # "settings/few/runs/distilled" reads "few/distilled"
            out.update(_peaks(value, path))
        else:
            out.update(_peaks(value, f"{path}/{label}" if path else label))
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
    rows, problems = read_metrics_lines(path)
    for problem in problems:
        log.warning("%s: left out of the report's plots", problem)
    return [r for r in rows if "eval" not in r]


def png_base64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


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
    return png_base64(fig)


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


def write_page(
    run_dir: Path, title: str, md: str, pngs: dict[str, str], captions: dict[str, str]
) -> tuple[Path, Path]:
    """``report.md`` (the Markdown, then each PNG written beside it as ``<name>.png`` with its
    caption) and the self-contained ``report.html``; returns both paths."""
    for name, data in pngs.items():
        (run_dir / f"{name}.png").write_bytes(base64.b64decode(data))
    images = "".join(f"\n![{captions[name]}]({name}.png)\n" for name in pngs)
    atomic_write_text(run_dir / "report.md", md + images)
    atomic_write_text(run_dir / "report.html", html_page(title, md, pngs))
    return run_dir / "report.md", run_dir / "report.html"
