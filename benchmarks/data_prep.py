"""Data preparation on a large JSON Lines file: potstill's roads against plain ``datasets``.

Writes ``--rows`` (default 1,000,000) short texts as JSON Lines, then, each phase in a fresh
process with an empty ``datasets`` cache of its own, times and measures the peak RSS of:

- classification road: ``load_table_splits`` + ``tokenize_table`` (MiniLM's tokenizer, 64
  tokens) against ``load_dataset("json")`` + ``Dataset.map(tokenizer)`` with the same tokenizer;
- causal-LM road: ``corpus_table`` (documents + EOS, windows of 128 tokens) against
  ``load_dataset("json")`` + the usual tokenize-then-group ``map`` (SmolLM2's tokenizer);
- each potstill road again in a new process on the cache the first left (a later run, or a
  resumed one).

Prints the ratios measured in this one run (goals: potstill / plain ≤ 1.1; peak RSS under 1.5
GB however many rows; the second run ≥ 20× faster than the first).

    python benchmarks/data_prep.py [--rows 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a cat dog model teacher student data loss token window batch fast small large "
         "learn predict label text corpus step run train test value").split()  # fmt: skip


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
            f.write(json.dumps({"text": f"{i}: {words}.", "label": i % 4}) + "\n")


def phase(name: str, path: str) -> None:
    """One measured phase, run in this (fresh) process: the clock starts once the libraries are
    imported and the tokenizer is loaded, and stops when the tokenized table is ready."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from potstill import assets
    from potstill.data.tables import load_table_splits
    from potstill.data.tokenized import tokenize_table
    from potstill.llm.user_data import corpus_table

    if "classify" in name:
        tok = AutoTokenizer.from_pretrained(assets.minilm_l6())
    else:
        tok = AutoTokenizer.from_pretrained(assets.resolve("HuggingFaceTB/SmolLM2-135M-Instruct"))
    eos = tok.eos_token_id

    def group(batch):
        ids = [x + [eos] for x in tok(batch["text"], add_special_tokens=False)["input_ids"]]
        flat = [t for x in ids for t in x]
        n = len(flat) // 128
        return {"input_ids": [flat[i * 128 : (i + 1) * 128] for i in range(n)]}

    t0 = time.perf_counter()
    if name.startswith("potstill-classify"):
        table = load_table_splits(path=path)["train"]
        out, _ = tokenize_table(table, tok, "text", max_length=64)
    elif name == "plain-classify":
        table = load_dataset("json", data_files=path, split="train")
        out = table.map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True)
    elif name.startswith("potstill-corpus"):
        table = load_table_splits(path=path)["train"]
        out, _ = corpus_table(table, tok, "text", max_length=128)
    elif name == "plain-corpus":
        table = load_dataset("json", data_files=path, split="train")
        out = table.map(group, batched=True, batch_size=1000, remove_columns=table.column_names)
    else:
        raise SystemExit(f"unknown phase {name}")
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"phase": name, "seconds": seconds, "peak_rss": rss, "rows": len(out)}))


def run_phase(name: str, path: Path, cache: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}  # fmt: skip
    out = subprocess.run(
        [sys.executable, __file__, "--phase", name, "--path", str(path)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--json", type=Path)
    p.add_argument("--phase")
    p.add_argument("--path")
    args = p.parse_args()
    if args.phase:
        phase(args.phase, args.path)
        return
    with tempfile.TemporaryDirectory(prefix="potstill-data-bench-") as tmp:
        root = Path(tmp)
        data = root / "rows.jsonl"
        t = time.perf_counter()
        write_rows(data, args.rows)
        print(f"wrote {args.rows:,} rows ({data.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t:.0f} s")  # fmt: skip
        results = {}
        for road in ("classify", "corpus"):
            # plain and potstill each with a fresh cache; then potstill again on its own cache
            results[f"plain-{road}"] = run_phase(
                f"plain-{road}", data, root / f"cache-plain-{road}"
            )
            mine = root / f"cache-potstill-{road}"
            results[f"potstill-{road}"] = run_phase(f"potstill-{road}", data, mine)
            results[f"potstill-{road}-again"] = run_phase(f"potstill-{road}-again", data, mine)
        for name, r in results.items():
            print(f"{name:24s} {r['seconds']:8.1f} s  peak RSS {r['peak_rss'] / 1e9:5.2f} GB  "
                  f"{r['rows']:,} rows")  # fmt: skip
        for road in ("classify", "corpus"):
            plain, mine = results[f"plain-{road}"], results[f"potstill-{road}"]
            again = results[f"potstill-{road}-again"]
            print(
                f"{road}: potstill / plain datasets.map = {mine['seconds'] / plain['seconds']:.2f}"
                f" (goal ≤ 1.1); second run {mine['seconds'] / again['seconds']:.0f}× faster "
                f"(goal ≥ 20×); peak RSS {mine['peak_rss'] / 1e9:.2f} GB (goal < 1.5)"
            )
        if args.json:
            args.json.write_text(json.dumps({"rows": args.rows, **results}, indent=2))


if __name__ == "__main__":
    main()
