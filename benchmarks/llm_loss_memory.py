"""Peak host memory of the LLM distillation loss: unchunked vs chunked vs fused linear.

Each method runs in a fresh subprocess (``ru_maxrss`` is a process-lifetime high-water mark).
The reported figure is the peak resident memory during forward + backward minus the peak after
the inputs (student hidden states, LM-head weight, teacher logits) were created, i.e. the
extra memory the loss itself needs, including the student logits where a method builds them
and the gradients it returns.

    .venv/bin/python benchmarks/llm_loss_memory.py            # N=2048, V=49152, H=576
    .venv/bin/python benchmarks/llm_loss_memory.py --n 8192   # SmolLM2 sizes, ~4x the memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ("unchunked", "chunked", "fused")


def _maxrss_mib() -> float:
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(method: str, n: int, vocab: int, hidden_size: int, kind: str, chunk: int) -> dict:
    """Run one method in this process and return its measurements."""
    import torch
    import torch.nn.functional as F

    from potstill.losses.divergences import divergence
    from potstill.losses.llm import chunked_divergence, fused_linear_divergence

    torch.set_num_threads(1)  # the benchmark machine is shared; memory, not speed, is measured
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).requires_grad_()
    teacher = torch.randn(n, vocab, generator=gen) * 2
    before = _maxrss_mib()
    start = time.perf_counter()
    if method == "fused":
        loss = fused_linear_divergence(hidden, weight, teacher, kind, chunk_size=chunk)
    else:
        logits = F.linear(hidden, weight)
        if method == "chunked":
            loss = chunked_divergence(logits, teacher, kind, chunk_size=chunk)
        else:
            loss = divergence(logits, teacher, kind)
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "loss": loss.item(),
        "extra_peak_mib": _maxrss_mib() - before,
        "seconds": seconds,
        "grad_weight_norm": weight.grad.norm().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="positions (batch × sequence)")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--kind", default="fkl")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        result = run_one(args.only, args.n, args.vocab, args.hidden, args.kind, args.chunk)
        print(json.dumps(result))
        return

    nv_mib = args.n * args.vocab * 4 / 2**20
    print(
        f"N={args.n} V={args.vocab} H={args.hidden} kind={args.kind} chunk={args.chunk} "
        f"float32; one N×V float32 tensor = {nv_mib:.0f} MiB"
    )
    results = {}
    for method in METHODS:
        # a fresh interpreter per method: ru_maxrss never goes down
        cmd = [sys.executable, __file__, "--only", method, "--n", str(args.n)]
        cmd += ["--vocab", str(args.vocab), "--hidden", str(args.hidden)]
        cmd += ["--kind", args.kind, "--chunk", str(args.chunk)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
    base = results["unchunked"]["extra_peak_mib"]
    for method in METHODS:
        r = results[method]
        print(
            f"{method:>9}: extra peak {r['extra_peak_mib']:8.0f} MiB "
            f"({r['extra_peak_mib'] / nv_mib:5.2f} × N×V, {r['extra_peak_mib'] / base:5.2f} × "
            f"unchunked)  {r['seconds']:6.1f} s  loss {r['loss']:.6f}  "
            f"|grad W| {r['grad_weight_norm']:.6f}"
        )


if __name__ == "__main__":
    main()
