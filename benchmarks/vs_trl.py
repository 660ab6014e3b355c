"""potstill against the field on this machine: the same LLM distillation step by potstill (live
teacher and cached teacher), a plain hand-written PyTorch loop, and TRL's GKDTrainer, with the
machine's matmul rate and the step's FLOP floor — measured in one sitting.

Setup, the same for every method: teacher SmolLM2-135M-Instruct (30 layers, fp32), student
derived from it by keeping 10 layers (weights copied, seed 0); rows of exactly 64 real tokens
cut from the ``smollm2-fortunes`` training data (no padding), batches of 4 rows in a fixed
order, loss on every next-token position; forward KL(teacher ‖ student) at temperature 1
(TRL: GKD with λ = 0, β = 0, i.e. off-policy forward KL); AdamW lr 1e-5, constant schedule,
gradient clipping at 1.0; fp32 (TRL's GKDConfig defaults to bf16 mixed precision: ``bf16=False``
for the fp32 rows; the ``-amp`` rows compare potstill's ``train.precision: bf16`` with TRL's
default); ``--threads`` threads. Each method runs in its own process (fresh
memory): ``--warmup`` steps, then ``--steps`` timed steps (timed by each method's own step
callback: start-up and loading are left out). Methods alternate (potstill, plain, TRL, cached,
potstill, …) for ``--rounds`` rounds; the report gives medians and spreads.

* tokens/s: 4 × 64 tokens per step over the measured seconds per step.
* peak memory: the process's peak resident set size while training (the kernel's VmHWM reset
  just before the first step: models, optimizer state, activations and libraries; the cached
  method frees the teacher first); also the increase over the resident size before training
  (measured after every teacher weight has been read once, so memory-mapped weights count
  before training, as they do in the peak).
* memory floor: the resident size just before training with every teacher weight resident
  (models, libraries, data) plus what fp32 AdamW training must add: the student's gradients
  and AdamW's two moments, 3 × its parameter bytes; no activation counted.
* FLOP floor: teacher forward 2·N_teacher·tokens + student forward and backward
  6·N_student·tokens (N = parameters, tied embeddings counted once), divided by the measured
  fp32 matmul rate (2048² matrices, ``--threads`` threads); each method's ratio to it.
* cached: the teacher's top-64 distributions of the same rows written once by
  :func:`potstill.cache.write_cache` before the rounds (its time is not in the step).
* bf16 teacher: potstill with the live teacher cast to bfloat16 (``teacher.dtype: bfloat16`` in
  a recipe; the student trains in fp32), where the CPU multiplies bf16 matrices natively
  (``avx512_bf16``/AMX); its cost in fidelity, KL(fp32 teacher ‖ bf16 teacher) per token and
  top-1 agreement on the benchmark rows, is reported with it.

Needs TRL (a benchmark-only extra: ``pip install -e '.[bench]'``; without it the TRL rows are
skipped). Writes ``--out``/vs_trl.json, vs_trl.md and vs_trl.png.

    .venv/bin/python benchmarks/vs_trl.py                  # about 12 minutes on 2 cores
    .venv/bin/python benchmarks/vs_trl.py --rounds 1 --steps 3   # quick look
    .venv/bin/python benchmarks/vs_trl.py --length 512 --methods potstill trl --rounds 1
        --steps 2 --warmup 1 --out /tmp/long     # longer rows: logit-sized memory matters
    .venv/bin/python benchmarks/vs_trl.py --length 512 --methods potstill potstill-fused trl
        --rounds 1 --steps 2 --warmup 1 --out /tmp/fused  # the fused LM head at long rows
    .venv/bin/python benchmarks/vs_trl.py --methods potstill potstill-compile --rounds 1
        --steps 6 --warmup 3 --out /tmp/compile  # torch.compile against eager

GPU mode (``--device cuda``): rows of 8 × ``--length`` tokens (1,024 and 4,096 are the
realistic ones; the fortunes tokens are repeated to fill them), every method in bf16 mixed
precision (potstill ``train.precision: bf16``, TRL ``bf16=True``, the plain loop under
``torch.autocast``), the teacher and the student on the GPU, each step timed after a
``torch.cuda.synchronize``; peak memory is ``torch.cuda.max_memory_allocated`` over training
(reset just before it), and the FLOP floor uses the measured bf16 matmul rate (8192² matrices):

    .venv/bin/python benchmarks/vs_trl.py --device cuda --length 4096 --rounds 1 --steps 5
        --warmup 2 --methods potstill potstill-fused plain trl --out /tmp/gpu4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = (
    "potstill", "plain", "trl", "potstill-cached", "potstill-bf16", "potstill-amp", "trl-amp",
    "potstill-compile", "potstill-fused",
)  # fmt: skip
# on request: torch.compile (minutes of compilation a run), the fused head (for long rows)
DEFAULT_METHODS = METHODS[:-2]
LR = 1e-5
LENGTH = int(os.environ.get("VS_TRL_LENGTH", "64"))  # tokens per row (--length)
DEVICE = os.environ.get("VS_TRL_DEVICE", "cpu")  # --device: cpu, or cuda (GPU mode)
GPU = DEVICE != "cpu"
BATCH = 8 if GPU else 4


def step_clock(times: list[float]) -> None:
    """Record the end of a step (on a GPU once its queued work is done)."""
    if GPU:
        torch.cuda.synchronize()
    times.append(time.perf_counter())


def rss_mb() -> float:
    """The current resident set size, MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) from now; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """The peak resident set size since the last :func:`reset_peak` (VmHWM), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(rows: int) -> tuple:
    """Teacher, derived student, tokenizer and ``rows`` rows of exactly LENGTH real tokens."""
    from potstill.recipe import load_recipe
    from potstill.runs.lm_data import lm_datasets, load_lm_teacher
    from potstill.students import derive

    recipe = load_recipe("smollm2-fortunes")
    teacher, tok = load_lm_teacher(recipe)
    train, _, _ = lm_datasets(recipe, tok)
    ids, mask = train.tensors["input_ids"], train.tensors["attention_mask"].bool()
    stream = torch.cat([ids[i][mask[i]] for i in range(len(ids))])
    need = rows * LENGTH
    if len(stream) < need and GPU:  # long GPU rows: the fortunes' tokens, repeated
        stream = stream.repeat(need // len(stream) + 1)
    if len(stream) < need:
        raise SystemExit(f"only {len(stream)} tokens of data for {need}")
    input_ids = stream[:need].reshape(rows, LENGTH).contiguous()
    torch.manual_seed(0)
    student = derive(teacher, keep=10)
    return teacher, student, tok, input_ids


def lm_rows(input_ids: torch.Tensor):
    """The rows as potstill's LM dataset: no prompt, every next token predicted."""
    from potstill.data.tensors import TensorDictDataset

    n = len(input_ids)
    return TensorDictDataset(
        {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "prompt_length": torch.zeros(n, dtype=torch.long),
        }
    )


def run_potstill(
    teacher, student, input_ids, steps: int, cache: Path | None, precision: str = "fp32",
    fused: bool = False,
) -> list[float]:  # fmt: skip
    from potstill import Distiller
    from potstill.cache import CachedTeacher
    from potstill.config import TrainConfig
    from potstill.llm.forward import causal_lm_forward, causal_lm_hidden_forward
    from potstill.losses.objective import Objective
    from potstill.losses.terms import token_term
    from potstill.teachers import LiveTeacher

    source = (
        CachedTeacher(cache, verify=False)
        if cache
        else LiveTeacher(teacher, forward=causal_lm_forward)
    )
    config = TrainConfig(
        max_steps=steps, batch_size=BATCH, shuffle=False, clip_grad_norm=1.0,
        optimizer={"name": "adamw", "lr": LR}, schedule={"name": "constant"},
        log_every=10**6, eval_every=10**6, progress=False, tensorboard=False,
        precision=precision,
    )  # fmt: skip
    times: list[float] = []
    Distiller(
        student, Objective([token_term("fkl", chunk_size=256 if fused else 1024)]),
        lm_rows(input_ids), teacher=source, config=config,
        student_forward=causal_lm_hidden_forward if fused else causal_lm_forward,
        callbacks=[lambda step, row: step_clock(times)], device=DEVICE,
    ).fit()  # fmt: skip
    return times


def run_plain(teacher, student, input_ids, steps: int) -> list[float]:
    """The loop a user would write by hand."""
    import torch.nn.functional as F

    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=LR)
    times = []
    amp = torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16, enabled=GPU)
    for step in range(steps):
        x = input_ids[step * BATCH : (step + 1) * BATCH].to(DEVICE)
        mask = torch.ones_like(x)
        with amp:
            with torch.no_grad():
                t = teacher(input_ids=x, attention_mask=mask).logits[:, :-1]
            s = student(input_ids=x, attention_mask=mask).logits[:, :-1]
            loss = F.kl_div(
                F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                reduction="sum",
            ) / (s.shape[0] * s.shape[1])  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_clock(times)
    return times


def run_trl(
    teacher, student, tok, input_ids, steps: int, folder: Path, bf16: bool = False
) -> list[float]:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback, default_data_collator
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the same rows in the same order
            return SequentialSampler(self.train_dataset)

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_clock(times)

    data = Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones_like(input_ids).tolist(),
            "labels": input_ids.tolist(),
        }
    )
    args = GKDConfig(
        output_dir=str(folder), per_device_train_batch_size=BATCH, max_steps=steps,
        lmbda=0.0, beta=0.0, temperature=1.0, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=not GPU, seed=0,
        dataloader_num_workers=0, disable_dropout=True, max_length=LENGTH, bf16=bf16,
    )  # fmt: skip
    trainer = InOrder(
        model=student, teacher_model=teacher, args=args, train_dataset=data,
        data_collator=default_data_collator, processing_class=tok, callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    return times


def worker(method: str, steps: int, warmup: int, cache: Path | None, out: Path) -> None:
    import gc

    total = steps + warmup
    teacher, student, tok, input_ids = setup(total * BATCH)
    extra: dict = {}
    if method == "potstill-cached":  # training from the cache needs no teacher in memory
        teacher = None
        gc.collect()
    if method == "potstill-bf16":
        extra = bf16_fidelity(teacher, input_ids)
        teacher = teacher.to(torch.bfloat16)
        gc.collect()
    if method == "potstill-compile":
        student.compile()  # in place; the compiled graphs are built in the warm-up steps
        teacher.compile()
    if GPU:
        student.to(DEVICE)
        if teacher is not None:
            teacher.to(DEVICE)
    if teacher is not None:  # every teacher page resident (memory-mapped weights) before
        with torch.no_grad():
            for t in teacher.parameters():
                t.sum()
    before = rss_mb()
    # what fp32 AdamW training cannot go below: everything resident now, plus the student's
    # gradients and AdamW's two moments
    trained = sum(t.numel() * t.element_size() for t in student.parameters() if t.requires_grad)
    floor = before + 3 * trained / 2**20
    from_start = not reset_peak()  # peak of training alone, where the kernel allows it
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated() / 2**20
    if method == "plain":
        times = run_plain(teacher, student, input_ids, total)
    elif method in ("trl", "trl-amp"):
        folder = out.parent / "trl-out"
        bf16 = method == "trl-amp" or GPU
        times = run_trl(teacher, student, tok, input_ids, total, folder, bf16=bf16)
    else:
        precision = "bf16" if method == "potstill-amp" or GPU else "fp32"
        fused = method == "potstill-fused"
        times = run_potstill(teacher, student, input_ids, total, cache, precision, fused)
    peak = peak_mb()
    if GPU:  # the GPU's memory is what a GPU run is short of: report it in place of RSS
        peak = torch.cuda.max_memory_allocated() / 2**20
        before, floor = gpu_before, gpu_before + 3 * trained / 2**20
    seconds = (times[-1] - times[warmup - 1]) / steps
    out.write_text(json.dumps({
        "method": method, "s_per_step": seconds, "tokens_per_s": BATCH * LENGTH / seconds,
        "peak_rss_mb": peak, "peak_includes_loading": from_start,
        "rss_before_training_mb": before, "training_increase_mb": peak - before,
        "memory_floor_mb": floor, **extra,
    }))  # fmt: skip


@torch.no_grad()
def bf16_fidelity(teacher, input_ids: torch.Tensor) -> dict:
    """KL(fp32 teacher ‖ its bf16 copy) per token and top-1 agreement on the first 8 rows."""
    import copy

    x = input_ids[:8]
    a = teacher(input_ids=x, use_cache=False).logits.float()
    b = copy.deepcopy(teacher).to(torch.bfloat16)(input_ids=x, use_cache=False).logits.float()
    lp, lq = a.log_softmax(-1), b.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    return {"bf16_kl": float(kl), "bf16_top1": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def write_cache_once(folder: Path, rows: int) -> Path:
    from potstill.cache import Encoding, write_cache
    from potstill.llm.forward import causal_lm_forward

    teacher, _, tok, input_ids = setup(rows)
    teacher.to(DEVICE)
    path = folder / "cache"
    write_cache(
        teacher, lm_rows(input_ids), path, unit="token", k=64, encoding=Encoding(),
        forward=causal_lm_forward, tokenizer=tok, batch_size=8, progress=False,
    )  # fmt: skip
    return path


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 20) -> float:
    """The best rate of ``repeats`` n × n matrix products, GFLOP/s: fp32 on the CPU, bf16 on
    the GPU (8192² there, synchronised)."""
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if GPU else torch.float32
    n = 8192 if GPU else n
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        if GPU:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if GPU:
            torch.cuda.synchronize()
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return max(rates)


def parameter_counts() -> tuple[int, int]:
    from potstill.models import count_parameters

    teacher, student, _, _ = setup(1)
    return count_parameters(teacher), count_parameters(student)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--length", type=int, help="tokens per row (default 64)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: the GPU mode")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.length:
        global LENGTH
        LENGTH = a.length
        os.environ["VS_TRL_LENGTH"] = str(a.length)  # the workers' rows too
    if a.device != DEVICE:
        os.environ["VS_TRL_DEVICE"] = a.device  # the module's settings follow in a fresh start
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    if a.worker:
        worker(a.worker, a.steps, a.warmup, a.cache, a.result)
        return
    import tempfile

    t0 = time.perf_counter()
    methods = list(a.methods)
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not installed (pip install -e '.[bench]'): skipping its rows")
        methods = [m for m in methods if m != "trl"]
    gflops = matmul_gflops(a.threads)  # the best of several: the machine's peak
    n_teacher, n_student = parameter_counts()
    tokens = BATCH * LENGTH
    floor_live = (2 * n_teacher + 6 * n_student) * tokens / (gflops * 1e9)
    floor_cached = 6 * n_student * tokens / (gflops * 1e9)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cache = None
        if "potstill-cached" in methods:
            cache = write_cache_once(folder, (a.steps + a.warmup) * BATCH)
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        for r in range(a.rounds):
            for m in methods:
                result = folder / f"{m}.json"
                cmd = [sys.executable, __file__, "--worker", m, "--steps", str(a.steps),
                       "--warmup", str(a.warmup), "--threads", str(a.threads),
                       "--device", DEVICE, "--result", str(result)]  # fmt: skip
                if m == "potstill-cached":
                    cmd += ["--cache", str(cache)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{m} failed:\n{done.stderr[-4000:]}")
                runs[m].append(json.loads(result.read_text()))
                x = runs[m][-1]
                print(f"round {r + 1} {m}: {x['s_per_step']:.2f} s/step, "
                      f"{x['tokens_per_s']:.0f} tokens/s, peak {x['peak_rss_mb']:.0f} MB",
                      flush=True)  # fmt: skip
    results = {
        "threads": a.threads, "torch": torch.__version__, "rounds": a.rounds, "steps": a.steps,
        "warmup": a.warmup, "batch": BATCH, "length": LENGTH, "matmul_gflops": gflops,
        "device": DEVICE, "device_name": torch.cuda.get_device_name() if GPU else "CPU",
        "teacher_parameters": n_teacher, "student_parameters": n_student,
        "floor_s_live": floor_live, "floor_s_cached": floor_cached, "runs": runs,
        "wall_min": (time.perf_counter() - t0) / 60,
    }  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "vs_trl.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (a.out / "vs_trl.md").write_text(table)
    plot(results, a.out / "vs_trl.png")
    print("\n" + table)


def markdown(r: dict) -> str:
    med = {m: {k: statistics.median(x[k] for x in runs) for k in runs[0]
               if isinstance(runs[0][k], float)}
           for m, runs in r["runs"].items()}  # fmt: skip
    base = med.get("trl") or med.get("potstill")
    base_name = "TRL" if "trl" in med else "potstill"
    lines = [
        f"SmolLM2-135M-Instruct → 10-layer derived student, batch {r['batch']} × {r['length']} "
        f"tokens, forward KL, AdamW, clipping 1.0, "
        + (
            f"{r['device_name']}, bf16 mixed precision, peak memory = GPU memory allocated, "
            if r.get("device", "cpu") != "cpu"
            else f"{r['threads']} threads, fp32, "
        )
        + f"torch "
        f"{r['torch']}; {r['rounds']} alternating rounds of {r['steps']} steps after "
        f"{r['warmup']} warm-up, medians (spread of tokens/s). Matmul rate "
        f"{r['matmul_gflops']:.0f} GFLOP/s; FLOP floor of the step {r['floor_s_live']:.2f} s "
        f"with a live teacher, {r['floor_s_cached']:.2f} s with a cached one. "
        f"{r['wall_min']:.1f} min.",
        "",
        f"| method | s/step | tokens/s (spread) | vs {base_name} | peak memory (MB) | vs "
        f"{base_name} | training increase (MB) | × FLOP floor | memory floor (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "potstill": "potstill (live teacher)",
        "plain": "plain PyTorch loop",
        "trl": "TRL GKDTrainer (λ 0, β 0)",
        "potstill-cached": "potstill (cached top-64)",
        "potstill-bf16": "potstill (live teacher in bf16)",
        "potstill-amp": "potstill (bf16 mixed precision)",
        "trl-amp": "TRL GKDTrainer (its default: bf16 mixed precision)",
        "potstill-compile": "potstill (torch.compile, student and teacher)",
        "potstill-fused": "potstill (fused LM head, chunks of 256)",
    }
    for m, x in med.items():
        rates = [y["tokens_per_s"] for y in r["runs"][m]]
        floor = r["floor_s_cached"] if m == "potstill-cached" else r["floor_s_live"]
        speed = x["tokens_per_s"] / base["tokens_per_s"]
        lines.append(
            f"| {names[m]} | {x['s_per_step']:.2f} | {x['tokens_per_s']:.1f} "
            f"({min(rates):.1f}–{max(rates):.1f}) | {speed:.2f}× "
            f"| {x['peak_rss_mb']:,.0f} | {x['peak_rss_mb'] / base['peak_rss_mb']:.2f}× | "
            f"{x['training_increase_mb']:,.0f} | {x['s_per_step'] / floor:.2f}× | "
            f"{x['memory_floor_mb']:,.0f} |"
        )
    if "potstill" in med:
        f = med["potstill"]["memory_floor_mb"]
        above = med["potstill"]["peak_rss_mb"] - f
        lines += ["", f"Memory floor: the resident size before training with every weight "
                  f"resident, plus the student's gradients and AdamW's two moments (3 × its fp32 "
                  f"bytes): {f:,.0f} MB with the live fp32 teacher, {f / base['peak_rss_mb']:.2f}× "
                  f"{base_name}'s peak. potstill's peak is {above:,.0f} MB above it."]  # fmt: skip
    if "potstill-bf16" in med:
        x = med["potstill-bf16"]
        lines += ["", f"bf16 teacher: KL(fp32 teacher ‖ bf16 teacher) {x['bf16_kl']:.4f} nats per "
                  f"token, top-1 agreement {x['bf16_top1']:.3f} (first 8 rows)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(r["runs"])
    rate = [statistics.median(x["tokens_per_s"] for x in r["runs"][m]) for m in methods]
    mem = [statistics.median(x["peak_rss_mb"] for x in r["runs"][m]) for m in methods]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.bar(methods, rate, color="#4c72b0")
    ax1.set_ylabel("tokens/s (higher is better)")
    ax2.bar(methods, mem, color="#dd8452")
    ax2.set_ylabel("peak memory, MB (lower is better)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=20)
    where = r.get("device_name", "CPU")
    fig.suptitle(f"SmolLM2-135M → 10 layers, forward KL, batch {r['batch']} × {r['length']}, "
                 f"{where}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
