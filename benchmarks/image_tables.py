"""Images read batch by batch: peak memory and speed of a pass over an image folder.

Writes ``--images`` (default 20,000) random 64×64 RGB PNGs as an image folder (10 classes),
then, each in a fresh process, measures one pass over all images in batches of 256:

- ``table``: potstill's road (``image_tables`` → ``ImageTable.batch``: the table stays on disk,
  each batch is decoded when it is read);
- ``tensor``: every image decoded into one float tensor first (what the road did before: the
  built-in datasets' form), then the same batches sliced from it.

Prints each phase's wall time and peak RSS above the process's RSS once the libraries were
imported, the ratio of the two peaks, and the decoded size of the whole folder (what a pass that
loads it whole must hold at least). Goal: the table road's peak stays flat however many
images; its time within 1.5× of the tensor road's (both decode every image once per pass).

    python benchmarks/image_tables.py [--images 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_folder(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(name: str, root: str) -> None:
    import torch

    from potstill.data.image_tables import image_tables

    base = rss_mb()
    start = time.perf_counter()
    table = image_tables(path=root)["all"]
    n = len(table)
    checksum = 0.0
    if name == "table":
        for lo in range(0, n, 256):
            checksum += float(table.batch(torch.arange(lo, min(lo + 256, n)))["input"].sum())
    else:
        whole = table.batch(torch.arange(n))["input"]  # every image decoded, held at once
        for lo in range(0, n, 256):
            checksum += float(whole[lo : lo + 256].sum())
    out = {"seconds": time.perf_counter() - start, "peak_mb": rss_mb() - base, "images": n,
           "checksum": round(checksum, 1)}  # fmt: skip
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--phase")
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.phase:
        phase(args.phase, args.root)
        return
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "images"
        t = time.perf_counter()
        write_folder(root, args.images)
        print(f"wrote {args.images:,} PNGs in {time.perf_counter() - t:.1f} s", flush=True)
        results = {}
        for name in ("table", "tensor"):
            env = {"HF_DATASETS_CACHE": str(Path(d) / f"cache-{name}"), "HF_DATASETS_OFFLINE": "1"}
            proc = subprocess.run(
                [sys.executable, __file__, "--phase", name, "--root", str(root)],
                capture_output=True, text=True, check=True,
                env={**__import__("os").environ, **env},
            )  # fmt: skip
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(name, results[name], flush=True)
    assert results["table"]["checksum"] == results["tensor"]["checksum"]  # the same pixels
    decoded_mb = args.images * 3 * 64 * 64 * 4 / 2**20
    summary = {
        "images": args.images,
        "decoded_mb": decoded_mb,
        "table": results["table"],
        "tensor": results["tensor"],
        "peak_ratio_table_over_tensor": results["table"]["peak_mb"] / results["tensor"]["peak_mb"],
        "time_ratio_table_over_tensor": results["table"]["seconds"] / results["tensor"]["seconds"],
    }
    print(
        f"{args.images:,} images ({decoded_mb:.0f} MB decoded): table road peak "
        f"{results['table']['peak_mb']:.0f} MB in {results['table']['seconds']:.1f} s; whole "
        f"tensor peak {results['tensor']['peak_mb']:.0f} MB in "
        f"{results['tensor']['seconds']:.1f} s; peak ratio "
        f"{summary['peak_ratio_table_over_tensor']:.3f}, time ratio "
        f"{summary['time_ratio_table_over_tensor']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
