"""The causal-LM run's report: every model against the teacher (perplexity, agreement, KL,
size, speed), the verdict of each objective against cross-entropy alone at the same steps, the
answers to held-out prompts, side-by-side generations, and the training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .page import describe_term, plot_metric_curves, where_it_ran, write_page


def lm_markdown(results: dict[str, Any]) -> str:
    """The causal-LM run's report as Markdown."""
    d, t = results["data"], results["train"]
    teacher = results["rows"]["teacher"]
    what = (
        "fortunes"
        if d.get("name", "fortunes") == "fortunes"
        else "prompts with the teacher's answers (sampled for training, greedy held out)"
    )
    if d.get("name") == "source":
        what = f"examples of your data ({d['described']}, style {d.get('style', 'auto')})"
    lines = [
        f"# potstill report: {results['name']}",
        "",
        f"Teacher `{results['teacher']}`; students derived from `{results['student']}` "
        f"(layers kept: {results['derived_layers']}). Training: {d['train']} {what} in "
        f"{d['format']} format ({d['response_tokens']} response tokens, prompts masked), "
        f"{t['steps']} steps of {t['batch_size']} sequences, lr {t['lr']}, the same for every "
        f"objective. Held-out: {d['val']} ({d['val_tokens']} response tokens). Seed "
        f"{results['seed']}, {results['threads']} threads, whole run "
        f"{results['wall_time_s'] / 60:.1f} min. {where_it_ran(results)}",
        *_cache_lines(results.get("teacher_cache")),
        "",
        "| model | objective | layers | parameters | size (MB) | perplexity | top-1 agreement "
        "| KL(teacher‖model) | forward tokens/s | generation tokens/s | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        objective = ", ".join(describe_term(o) for o in r.get("objective", [])) or "—"
        if r.get("on_policy"):
            objective += f", on-policy λ = {r['on_policy']:g}"
        train_s = f"{r['train_time_s']:.0f}" if "train_time_s" in r else "—"
        lines.append(
            f"| {name} | {objective} | {r['layers']} | {r['parameters'] / 1e6:.1f}M | "
            f"{r['file_bytes'] / 1e6:.0f} | {r['perplexity']:.2f} | "
            f"{r['top1_agreement']:.3f} | {r['kl_to_teacher']:.3f} | "
            f"{r['forward_tokens_per_s']:.0f} | {r['generate_tokens_per_s']:.1f} | {train_s} |"
        )
    best = min(
        (n for n in results["rows"] if n != "teacher"),
        key=lambda n: results["rows"][n]["perplexity"],
    )
    ce = [n for n, r in results["rows"].items() if _only_ce(r)]
    lines += [
        "",
        f"Lowest held-out perplexity among students: **{best}** "
        f"({results['rows'][best]['perplexity']:.2f}; teacher {teacher['perplexity']:.2f}).",
    ]
    if ce:
        base = results["rows"][ce[0]]
        for name, r in results["rows"].items():
            if "objective" in r and not _only_ce(r):
                verdict = "better" if r["perplexity"] < base["perplexity"] else "not better"
                lines.append(
                    f"- {name}: perplexity {r['perplexity']:.2f} vs {base['perplexity']:.2f} by "
                    f"cross-entropy alone at the same steps ({verdict})."
                )
    lines += [
        "",
        "Perplexity: exp of the mean next-token loss on the held-out responses. Top-1 "
        "agreement: share of those positions where the model's most likely token is the "
        "teacher's. KL: mean per-token KL(teacher ‖ model) at temperature 1. Forward tokens/s: "
        "one batch of held-out sequences; generation: greedy decoding at batch 1. Measured on "
        "this machine's CPU in this run; short budgets like this one show early training, not "
        "converged students.",
        "",
        *_answer_lines(results.get("answers"), results["rows"]),
        "## Generations (greedy)",
        "",
        *_side_by_side(results["prompts"], results["generations"], "output"),
    ]
    return "\n".join(lines)


def _side_by_side(prompts: list[str], texts: dict[str, list[str]], column: str) -> list[str]:
    """One table per prompt: each model's text on one line."""
    lines: list[str] = []
    for i, prompt in enumerate(prompts):
        lines += [f"**{prompt}**", "", f"| model | {column} |", "|---|---|"]
        for name, by_prompt in texts.items():
            text = " ".join(by_prompt[i].split()).replace("|", "\\|")
            lines.append(f"| {name} | {text} |")
        lines.append("")
    return lines


def _answer_lines(answers: dict[str, Any] | None, rows: dict[str, Any]) -> list[str]:
    if not answers:
        return []
    lines = [
        "## Answers to held-out prompts",
        "",
        "Greedy answers of each model to the held-out prompts. Teacher log-prob: the teacher's "
        "mean log-probability per answer token (higher: the teacher finds the answer likelier). "
        "ROUGE-L: F1 against the teacher's own greedy answers. Length: mean answer tokens.",
        "",
        "| model | on-policy λ | teacher log-prob per token | ROUGE-L vs teacher | length |",
        "|---|---|---|---|---|",
    ]
    for name, r in answers["rows"].items():
        lam = rows[name].get("on_policy")
        lines.append(
            f"| {name} | {'—' if lam is None else f'{lam:g}'} | {r['answer_teacher_logp']:.3f} | "
            f"{r['answer_rouge_l']:.3f} | {r['answer_tokens']:.1f} |"
        )
    lines.append("")
    return lines + _side_by_side(answers["prompts"], answers["answers"], "answer")


def _cache_lines(cache: dict[str, Any] | None) -> list[str]:
    if not cache:
        return ["", "Teacher: run live on every training batch."]
    e = cache["encoding"]
    return [
        "",
        f"Teacher: read from its cache `{cache['path']}` (top-{cache['k']}, log-probs "
        f"{e['logprobs']}, compression {e['compression']}; {cache['bytes'] / 1e6:.1f} MB for "
        f"{cache['positions']:,} tokens, {cache['bytes_per_token']:.0f} bytes per token; ready "
        f"in {cache['ready_s']:.0f} s, filling included). The token terms compare the student "
        f"with the teacher on k + 1 buckets (the top-{cache['k']} tokens and the rest).",
    ]


def _only_ce(row: dict[str, Any]) -> bool:
    objective = row.get("objective")
    return bool(objective) and all(o["kind"] == "ce" for o in objective)


def write(run_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """report.md and a self-contained report.html with the training curves."""
    curves = {name: run_dir / r["metrics"] for name, r in results["rows"].items() if "metrics" in r}
    png = plot_metric_curves(curves, "loss", "training loss (each variant's own objective)")
    md = lm_markdown(results)
    return write_page(run_dir, results["name"], md, {"losses": png}, {"losses": "training loss"})


def console(run_dir: Path, results: dict[str, Any]) -> str:
    """What ``potstill distill`` prints: the report's text (no images) and where it is."""
    text = (run_dir / "report.md").read_text().split("\n![")[0]
    return f"{text}\nreport: {run_dir / 'report.md'}  and  {run_dir / 'report.html'}"
