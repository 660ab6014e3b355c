"""The prepared GPU check: what a lent GPU machine runs in under 10 minutes, into one JSON.

1. The machine: torch, CUDA, the GPU's name, memory and compute capability.
2. The suite's GPU tests (``-m gpu``: ``tests/test_cuda.py``), and every recipe kind for a few
   steps on the GPU against the CPU (``tests/test_gpu_road.py`` with
   ``POTSTILL_ROAD_DEVICE=cuda``), with the device-placement tests; counts and failures.
3. ``benchmarks/vs_trl.py --device cuda`` at 8 × 1,024 and 8 × 4,096 tokens (bf16, forward
   KL; potstill with the fused head off and on, a plain loop, TRL's GKDTrainer when installed):
   tokens/s, peak GPU memory, the ratios to TRL and the step against the bf16 FLOP floor.

Every part runs in its own process with its own time limit, so one that fails or hangs leaves
the others' figures; the JSON says which did what.

    .venv/bin/python benchmarks/gpu_check.py --out /tmp/gpu     # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --quick            # tests only (no benchmarks)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from gpu_bundle import STAND_IN  # beside this script

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict:
    """What the check ran on."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus}
    if info["gpus"]:
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, memory_gb=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}")  # fmt: skip
    return info


def models() -> dict:
    """Where each packaged model came from; ``stand-in`` where its weights are random ones of its
    architecture (``benchmarks/gpu_bundle.py``: the real ones do not travel to a lent machine)."""
    from potstill import assets

    found = {}
    for name in assets.PACKAGED:
        local = assets.resolve(name)
        if local == name:
            found[name] = {"weights": "not here"}
            continue
        stand_in = (Path(local) / STAND_IN).exists()
        found[name] = {"path": local, "weights": "random stand-in" if stand_in else "real"}
    return found


def pytest_part(name: str, args: list[str], out: Path, limit: int, env: dict | None = None) -> dict:
    """One pytest run: its counts, failures and time (junit XML read back)."""
    xml = out / f"{name}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *args]  # fmt: skip
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=limit,
                              capture_output=True, text=True)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {limit} s", "seconds": limit}
    result: dict = {"returncode": done.returncode, "seconds": round(time.perf_counter() - t, 1)}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        result.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        result["failed"] = [
            f"{case.get('classname')}::{case.get('name')}: " + (case[0].get("message") or "")[:300]
            for case in suite.iter("testcase")
            if any(child.tag in ("failure", "error") for child in case)
        ]
    else:
        result["output"] = (done.stdout + done.stderr)[-3000:]
    return result


def benchmark_part(length: int, out: Path, limit: int, methods: list[str]) -> dict:
    """``vs_trl.py --device cuda`` at 8 × ``length`` tokens: its JSON, read back."""
    folder = out / f"vs_trl_{length}"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--device", "cuda",
           "--length", str(length), "--rounds", "1", "--steps", "5", "--warmup", "2",
           "--methods", *methods, "--out", str(folder)]  # fmt: skip
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, timeout=limit, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {limit} s", "seconds": limit}
    if done.returncode != 0:
        return {"returncode": done.returncode, "output": (done.stdout + done.stderr)[-3000:]}
    results = json.loads((folder / "vs_trl.json").read_text())
    results["seconds"] = round(time.perf_counter() - t, 1)
    results["table"] = (folder / "vs_trl.md").read_text()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    p.add_argument("--quick", action="store_true", help="the tests only, no benchmarks")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"machine": machine(), "models": models()}

    def save() -> None:  # after every part: a check stopped at its limit keeps what it had
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        (a.out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    if not report["machine"]["gpus"]:
        print("no CUDA GPU here: the GPU tests skip; run this on a GPU machine")
    report["gpu_tests"] = pytest_part("gpu_tests", ["-m", "gpu", "tests/test_cuda.py"],
                                      a.out, limit=150)  # fmt: skip
    save()
    report["recipe_kinds_on_gpu"] = (
        pytest_part(
            "road", ["tests/test_gpu_road.py", "tests/test_placement.py"], a.out, limit=200,
            env={"POTSTILL_ROAD_DEVICE": "cuda"},
        )
        if report["machine"]["gpus"]
        else {"status": "not run: no GPU (the CPU suite runs them on the fake GPU)"}
    )  # fmt: skip
    save()
    if not a.quick and report["machine"]["gpus"]:
        try:
            import trl  # noqa: F401

            methods = ["potstill", "potstill-fused", "plain", "trl"]
        except ImportError:
            methods = ["potstill", "potstill-fused", "plain"]
        report["vs_trl"] = {}
        for n, limit in ((1024, 150), (4096, 180)):
            report["vs_trl"][str(n)] = benchmark_part(n, a.out, limit=limit, methods=methods)
            save()
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "vs_trl"}, indent=1))
    for n, r in report.get("vs_trl", {}).items():
        print(f"\nvs_trl at 8 × {n} tokens:\n{r.get('table', r)}")


if __name__ == "__main__":
    main()
