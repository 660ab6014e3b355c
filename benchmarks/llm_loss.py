"""Peak memory and time of potstill's chunked LLM losses against straightforward autograd.

Four methods, forward + backward of a mean divergence over N positions and a V-token vocabulary:

* ``straightforward``: ``potstill.losses.divergences.divergence(student_logits, teacher_logits,
  kind)``, plain autograd over the full ``(N, V)`` tensors (every float32 intermediate and its
  gradient materialised). This is the fair baseline: the same formulas, unchunked.
* ``chunked``: :func:`potstill.losses.chunked.chunked_divergence` on the same two ``(N, V)`` inputs.
* ``linear+straightforward``: ``divergence(F.linear(hidden, weight), teacher_logits, kind)``,
  the straightforward counterpart of the fused form: its inputs are the student's last hidden
  states ``(N, H)`` and output weight ``(V, H)``.
* ``fused``: :func:`potstill.losses.fused.fused_linear_divergence` on those inputs.

Memory: each method runs once in each of ``--mem-runs`` fresh subprocesses (``ru_maxrss`` is a
process-lifetime high-water mark); the figure is the peak resident memory during forward +
backward minus the peak after the inputs were created (without temporaries), i.e. the extra
memory the loss needs, including the gradients it returns (and the student logits where a
method builds them). The chunked methods' figure varies between processes by a few chunk-sized
buffers (glibc serves the freed chunk buffers from more than one malloc arena, unpredictably),
so the goal is checked on potstill's worst run against the straightforward method's best.

Time: one more subprocess per kind times every method in turn, after one warm-up call each:
``--reps`` rounds, each timing one forward + backward of every method (order rotated between
rounds); reported are each method's median and the median (min–max) of the per-round ratios.
The machine may be shared: compare the ratios, not the seconds.

Goals (the chunked divergence against the straightforward one): peak memory ≤ 0.25× and time
≤ 1.2×; the fused form is checked against the same goals, against linear+straightforward. The
chunked divergence returns the student's ``N × V`` gradient, so its memory ratio is at least
one over the straightforward peak in ``N × V`` units (the printed ``× N×V`` column): 1/7 for fkl
and rkl, about 1/12 for jsd, skl and srkl, but 1/5 for tvd and 1/4 for mse, whose
straightforward graphs are small; for mse no method that returns the gradient can meet the
memory goal, and tvd sits at about 0.25 with the default chunk. ``chunk_size`` is potstill's
default, :func:`potstill.losses.chunked.default_chunk_size` (170 positions at V = 49,152), unless
``--chunk`` is given.

    .venv/bin/python benchmarks/llm_loss.py                     # fkl, N=2048, V=49152, H=576
    .venv/bin/python benchmarks/llm_loss.py --all-kinds         # every divergence kind
    .venv/bin/python benchmarks/llm_loss.py --n 8192 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("straightforward", "chunked", "linear+straightforward", "fused")
PAIRS = (("chunked", "straightforward"), ("fused", "linear+straightforward"))
KINDS = ("fkl", "rkl", "jsd", "tvd", "mse", "skl", "srkl")
MEMORY_GOAL, TIME_GOAL = 0.25, 1.2


def _maxrss_mib() -> float:
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(args: argparse.Namespace, methods: tuple[str, ...]) -> dict:
    """Inputs of ``methods``, seeded and created in place (no temporary as large as an input).

    Methods share them: the teacher logits, the student logits (dense methods) and the hidden
    states and weight (linear methods); leaves require grad.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    inputs = {"teacher": torch.randn(args.n, args.vocab, generator=gen).mul_(2)}
    if {"straightforward", "chunked"} & set(methods):
        student = torch.randn(args.n, args.vocab, generator=gen).mul_(2)
        inputs["student"] = student.requires_grad_()
    if {"linear+straightforward", "fused"} & set(methods):
        inputs["hidden"] = torch.randn(args.n, args.hidden, generator=gen).requires_grad_()
        weight = torch.randn(args.vocab, args.hidden, generator=gen).div_(args.hidden**0.5)
        inputs["weight"] = weight.requires_grad_()
    return inputs


def _step(method: str, inputs: dict, args: argparse.Namespace, kind: str):
    """One forward + backward; returns the loss. Gradients are left in the leaves' ``.grad``."""
    import torch.nn.functional as F

    from potstill.losses.chunked import chunked_divergence
    from potstill.losses.divergences import divergence
    from potstill.losses.fused import fused_linear_divergence

    chunk = {} if args.chunk is None else {"chunk_size": args.chunk}
    teacher = inputs["teacher"]
    if method == "straightforward":
        loss = divergence(inputs["student"], teacher, kind)
    elif method == "chunked":
        loss = chunked_divergence(inputs["student"], teacher, kind, **chunk)
    elif method == "linear+straightforward":
        loss = divergence(F.linear(inputs["hidden"], inputs["weight"]), teacher, kind)
    else:
        loss = fused_linear_divergence(inputs["hidden"], inputs["weight"], teacher, kind, **chunk)
    loss.backward()
    return loss


def _leaves(inputs: dict) -> list:
    return [t for t in inputs.values() if t.requires_grad]


def measure_memory(method: str, args: argparse.Namespace, kind: str) -> dict:
    """Run ``method`` once in this (fresh) process: its extra peak memory and loss."""
    inputs = _inputs(args, (method,))
    before = _maxrss_mib()
    loss = _step(method, inputs, args, kind)
    extra = _maxrss_mib() - before
    grad_norm = sum(float(t.grad.double().square().sum()) for t in _leaves(inputs)) ** 0.5
    return {"extra_peak_mib": extra, "loss": loss.item(), "grad_norm": grad_norm}


def measure_time(args: argparse.Namespace, kind: str) -> dict:
    """Time every method in this process: ``{method: [seconds per round]}``."""
    inputs = _inputs(args, METHODS)

    def timed(method: str) -> float:
        for leaf in _leaves(inputs):
            leaf.grad = None
        start = time.perf_counter()
        _step(method, inputs, args, kind)
        return time.perf_counter() - start

    for method in METHODS:  # warm-up
        timed(method)
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for rep in range(args.reps):
        order = METHODS[rep % len(METHODS) :] + METHODS[: rep % len(METHODS)]
        for method in order:
            seconds[method].append(timed(method))
    return seconds


def _child(args: argparse.Namespace) -> None:
    import torch

    import potstill.losses.chunked  # noqa: F401
    import potstill.losses.fused  # noqa: F401  (imported before the memory baseline)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child == "time":
        result = {"threads": torch.get_num_threads(), "seconds": measure_time(args, args.kind)}
    else:
        result = measure_memory(args.child, args, args.kind)
    print(json.dumps(result))


def _run_child(args: argparse.Namespace, child: str, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--child", child, "--kind", kind, "--n", str(args.n)]
    cmd += ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--reps", str(args.reps)]
    if args.chunk is not None:
        cmd += ["--chunk", str(args.chunk)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ratio_stats(seconds: dict, num: str, den: str) -> tuple[float, float, float]:
    ratios = [a / b for a, b in zip(seconds[num], seconds[den], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def bench_kind(args: argparse.Namespace, kind: str) -> dict:
    runs = {m: [_run_child(args, m, kind) for _ in range(args.mem_runs)] for m in METHODS}
    peaks = {m: [r["extra_peak_mib"] for r in runs[m]] for m in METHODS}
    timing = _run_child(args, "time", kind)
    seconds = timing["seconds"]
    nv_mib = args.n * args.vocab * 4 / 2**20
    print(
        f"\nkind={kind}  ({timing['threads']} threads; memory: {args.mem_runs} fresh processes "
        f"per method, median and max; time: {args.reps} rounds, median)"
    )
    print(
        f"{'method':>24} {'extra peak MiB':>15} {'max MiB':>8} {'× N×V':>7} {'median s':>9} "
        f"{'loss':>12}"
    )
    for m in METHODS:
        med, top, secs = statistics.median(peaks[m]), max(peaks[m]), statistics.median(seconds[m])
        print(
            f"{m:>24} {med:15.0f} {top:8.0f} {med / nv_mib:7.2f} {secs:9.3f} "
            f"{runs[m][0]['loss']:12.6f}"
        )
    result = {"kind": kind, "threads": timing["threads"], "memory": runs, "seconds": seconds}
    for num, den in PAIRS:
        # the worst run of potstill's method against the best of the straightforward one
        mem_ratio = max(peaks[num]) / min(peaks[den])
        mem_median = statistics.median(peaks[num]) / statistics.median(peaks[den])
        t_med, t_min, t_max = _ratio_stats(seconds, num, den)
        print(
            f"{num} / {den}: memory {mem_ratio:.3f}× (worst run; {mem_median:.3f}× median), "
            f"time {t_med:.3f}× (rounds {t_min:.3f}–{t_max:.3f})"
        )
        result[f"{num}/{den}"] = {
            "memory": mem_ratio,
            "memory_median": mem_median,
            "time": t_med,
            "time_range": [t_min, t_max],
        }
        # a sanity check (the tests check values and gradients properly): float32 sums over
        # N × V terms in a different order agree to about 1e-6
        a, b = runs[num][0], runs[den][0]
        gaps = [abs(a[q] / b[q] - 1) for q in ("loss", "grad_norm")]
        if max(gaps) > 1e-4:
            print(f"  WARNING: {num} and {den} disagree: relative gaps (loss, |grad|) {gaps}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="positions (batch × sequence)")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--kind", default="fkl", choices=KINDS)
    parser.add_argument("--all-kinds", action="store_true", help="every kind, one after another")
    parser.add_argument(
        "--chunk", type=int, help="chunk_size (default: potstill's, default_chunk_size(V))"
    )
    parser.add_argument("--reps", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument(
        "--mem-runs", type=int, default=3, help="fresh processes per method for the memory peak"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. all)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    from potstill.losses.chunked import default_chunk_size

    chunk = default_chunk_size(args.vocab) if args.chunk is None else args.chunk
    nv_mib = args.n * args.vocab * 4 / 2**20
    print(
        f"N={args.n} V={args.vocab} H={args.hidden} chunk={chunk} float32; "
        f"one N×V float32 tensor = {nv_mib:.0f} MiB"
    )
    results = [bench_kind(args, kind) for kind in (KINDS if args.all_kinds else (args.kind,))]

    print("\nGoals (memory ≤ 0.25×, worst run; time ≤ 1.2×, median of rounds):")
    for num, den in PAIRS:
        for r in results:
            ratios = r[f"{num}/{den}"]
            for goal, value, limit in (
                ("memory", ratios["memory"], MEMORY_GOAL),
                ("time", ratios["time"], TIME_GOAL),
            ):
                verdict = "goal met" if value <= limit else "goal NOT met"
                print(f"  {r['kind']:>4} {num} / {den} {goal}: {value:.3f}× ≤ {limit}: {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
