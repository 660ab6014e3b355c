"""The fault-injection harness shared by tests/test_fault_injection.py and
benchmarks/soak.py: small recipes of every run kind, the command line run as a user runs it
(a fresh process), SIGKILL at a fault point (:mod:`potstill.faults`) or at a random moment,
resume, and a fingerprint of what a run leaves (weights, caches, answers, logged figures,
results) to compare with an uninterrupted run."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from potstill import faults

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
KINDS = ("classic", "text-classification", "embed", "causal-lm", "chain")

# figures that measure this machine (time, speed, memory) or name the process, not the run's
# outcome: they differ between two uninterrupted runs and are left out of a comparison
VOLATILE = (
    "time", "_s", "per_s", "latency", "throughput", "speed", "memory", "mb", "wall",
    "created", "updated", "host", "pid", "threads", "seconds", "rss", "peak", "tokens_per",
    "speedup", "started", "finished_at", "potstill_version", "elapsed", "rate",
)  # fmt: skip


def volatile(key: str) -> bool:
    k = key.lower()
    return any(v in k for v in VOLATILE)


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        # a row's check covers its volatile figures too: the row's other figures are compared
        return {k: _stable(v) for k, v in value.items() if not volatile(str(k)) and k != "check"}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, str) and "/" in value and ("/tmp" in value or value.startswith("/")):
        return "<path>"  # a folder (the run's own, or a temporary one)
    return value


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors_sha(path: Path) -> str:
    """A safetensors file's tensors (name, dtype, shape, bytes) and metadata: its header's
    order is not fixed (safetensors writes the metadata from a hash map), its content is."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch_uint8()).numpy().tobytes())
    return h.hexdigest()


def torch_uint8():  # noqa: ANN201  (torch imported late: the harness loads without it)
    import torch

    return torch.uint8


def fingerprint(run: Path) -> dict[str, Any]:
    """What an uninterrupted run and an interrupted, resumed one must share: the bytes of every
    weight file, cache shard and answers file outside ``checkpoints/``, each ``metrics.jsonl``
    row and ``results.json`` without the figures that measure the machine."""
    out: dict[str, Any] = {}
    for file in sorted(run.rglob("*")):
        rel = file.relative_to(run)
        if not file.is_file() or "checkpoints" in rel.parts or rel.name.startswith("."):
            continue
        if file.suffix == ".safetensors":
            out[str(rel)] = _tensors_sha(file)
        elif file.name.endswith(".jsonl") and "answers" in rel.parts:
            out[str(rel)] = _sha(file)
        elif file.name == "metrics.jsonl":
            try:
                out[str(rel)] = [_stable(json.loads(x)) for x in file.read_text().splitlines()]
            except ValueError:  # a damaged log (left as it was): its bytes, which differ
                out[str(rel)] = "damaged " + _sha(file)
        elif file.name == "results.json":
            try:
                out[str(rel)] = _stable(json.loads(file.read_text()))
            except ValueError:
                out[str(rel)] = "damaged " + _sha(file)
    return out


REL = 1e-9
"""How far two reported figures may differ: two uninterrupted runs on this machine differ in
the 16th digit of a float64 least-squares figure (an embed run's ``linear_map_cosine``);
weights, caches and answers are compared bit for bit."""


def same(a: Any, b: Any) -> bool:
    """Equal, floats to :data:`REL` relative."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= REL * max(abs(a), abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys of two fingerprints that differ (missing on one side included)."""
    return sorted(k for k in a.keys() | b.keys() if not same(a.get(k), b.get(k)))


# --- the recipes ------------------------------------------------------------------------------


def _fortunes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        "computers": ["Never trust a computer you cannot throw out of a window.",
                      "There are two kinds of software: the broken and the not yet broken.",
                      "To err is human; to really foul things up takes a computer."],
        "love": ["Love conquers all things except poverty and toothache.",
                 "Love is the triumph of imagination over intelligence.",
                 "Love is a grave mental disease, according to Plato at least."],
    }  # fmt: skip
    for name, entries in texts.items():
        (folder / name).write_text("\n%\n".join(entries) + "\n%\n")
    return folder


def _topics_csv(path: Path, n: int = 60) -> Path:
    from potstill.data.fortunes import fortune_entries

    classes = ["computers", "politics", "science"]
    entries = [(c, t) for c, t in fortune_entries() if c in classes]
    random.Random(0).shuffle(entries)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sentence", "topic"])
        w.writeheader()
        w.writerows({"sentence": t[:200], "topic": c} for c, t in entries[:n])
    return path


def _llama(folder: Path, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from potstill import assets

    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(assets.resolve("HuggingFaceTB/SmolLM2-135M-Instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TRAIN = {"progress": False, "tensorboard": False, "checkpoint_every": 2, "log_every": 2}


def recipes(root: Path) -> dict[str, Path]:
    """A small recipe of each kind under ``root`` (with the models and data it needs), by kind;
    every model checkpoints every 2 steps so that a kill mid-training resumes mid-training."""
    root.mkdir(parents=True, exist_ok=True)
    data: dict[str, dict[str, Any]] = {}
    data["classic"] = {
        "name": "fault-classic", "seed": 0,
        "data": {"name": "digits", "val_size": 158},
        "teacher": {"arch": {"hidden": [32]},
                    "train": {**TRAIN, "max_steps": 8, "batch_size": 64}},
        "student": {"arch": {"hidden": [8]}},
        "train": {**TRAIN, "max_steps": 6, "batch_size": 64, "eval_every": 3},
        "evaluation": {"measure_cache_speedup": False},
    }  # fmt: skip
    data["text-classification"] = {
        "kind": "text-classification", "name": "fault-topics", "seed": 0,
        "data": {"path": str(_topics_csv(root / "topics.csv")),
                 "columns": {"text": "sentence", "label": "topic"},
                 "max_length": 24, "val_size": 12, "test_size": 12},
        "teacher": {"model": MINILM_NAME,
                    "finetune": {**TRAIN, "max_steps": 4, "batch_size": 8,
                                 "optimizer": {"lr": 2e-4}}},
        "student": {"keep": 1},
        "train": {**TRAIN, "max_steps": 4, "batch_size": 8, "optimizer": {"lr": 2e-4}},
        "evaluation": {"throughput_batch": 4},
    }  # fmt: skip
    data["embed"] = {
        "kind": "embed", "name": "fault-embed", "seed": 0,
        "teacher": {"model": MINILM_NAME},
        "student": {"model": MINILM_NAME, "keep": 1},
        "data": {"train": 24, "val": 12, "max_length": 16},
        "variants": {"embedding": [
            {"kind": "feature", "student": "logits", "teacher": "logits", "loss": "cosine"}]},
        "train": {**TRAIN, "max_steps": 4, "batch_size": 8},
        "latency_batch": 1, "throughput_batch": 4,
    }  # fmt: skip
    llama2 = _llama(root / "llama2", 2)
    data["causal-lm"] = {
        "kind": "causal-lm", "name": "fault-lm", "seed": 0,
        "teacher": {"model": str(llama2), "cache": {"k": 8, "shard_size": 2}},
        "student": {"keep": 1},
        "data": {"name": "instructions", "train": 6, "val": 2, "max_length": 48,
                 "answers": {"max_new_tokens": 4, "batch_size": 2}},
        "variants": {"fkl": [{"kind": "fkl"}], "ce": [{"kind": "ce"}]},
        "train": {**TRAIN, "max_steps": 4, "batch_size": 2, "optimizer": {"lr": 0.01}},
        "chunk_size": 64, "eval_batch_size": 2,
        "generate": {"prompts": ["Say hi."], "max_new_tokens": 2},
    }  # fmt: skip
    llama4 = _llama(root / "llama4", 4)
    data["chain"] = {
        "kind": "chain", "name": "fault-chain", "assistants": 1,
        "base": {
            "kind": "causal-lm", "name": "fault-chain-base", "seed": 0,
            "teacher": {"model": str(llama4), "cache": {"k": 8}},
            "student": {"keep": 1},
            "data": {"folder": str(_fortunes(root / "fortunes")), "train": 4, "val": 2,
                     "max_length": 40, "prompt": "A fortune about {category}."},
            "variants": {"fkl": [{"kind": "fkl"}]},
            "train": {**TRAIN, "max_steps": 4, "batch_size": 2, "optimizer": {"lr": 0.01}},
            "chunk_size": 64, "eval_batch_size": 2,
            "generate": {"prompts": ["A fortune about love."], "max_new_tokens": 2},
        },
    }  # fmt: skip
    out = {}
    for kind, recipe in data.items():
        out[kind] = root / f"{kind}.yaml"
        out[kind].write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


# --- running ----------------------------------------------------------------------------------


def env(**extra: str) -> dict[str, str]:
    """The environment of a run: one thread, no fault settings but ``extra``."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("POTSTILL_FAULT_")}
    e.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return e


def command(recipe: Path, out: Path, *, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "potstill.cli", "distill", str(recipe), "--out", str(out),
           "--threads", "1"]  # fmt: skip
    return cmd + (["--resume"] if resume else [])


def run(recipe: Path, out: Path, *, resume: bool = False, timeout: float = 900,
        **extra: str) -> subprocess.CompletedProcess:  # fmt: skip
    """``potstill distill recipe --out out`` in a fresh process (``extra``: environment)."""
    return subprocess.run(command(recipe, out, resume=resume), env=env(**extra),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@dataclass
class Reference:
    """An uninterrupted run: its fingerprint, the fault points it passed and its duration."""

    out: Path
    fingerprint: dict[str, Any]
    points: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    order: list[str] = field(default_factory=list)  # the points in the order first reached
    trace: list[str] = field(default_factory=list)  # every point passed, in order

    def occurrence(self, name: str, after: str) -> int:
        """Which occurrence of point ``name`` first follows the first ``after``."""
        start = self.trace.index(after)
        return self.trace[:start].count(name) + 1

    def phases(self) -> list[str]:
        """The run's phases in the order it first reaches them."""
        return list(dict.fromkeys(phase(p) for p in self.order))


def reference(recipe: Path, out: Path) -> Reference:
    trace = out.parent / f"{out.name}.trace"
    t0 = time.perf_counter()
    r = run(recipe, out, **{faults.ENV_TRACE: str(trace)})
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise AssertionError(f"the uninterrupted run failed:\n{r.stderr[-4000:]}")
    passed = trace.read_text().split("\n")[:-1]
    return Reference(out, fingerprint(out), Counter(passed), seconds,
                     list(dict.fromkeys(passed)), passed)  # fmt: skip


def phase(point: str) -> str:
    """A point's phase: ``train:<model>``, ``cache``, ``answers``, ``export``, ``report`` or
    ``write`` (any file written)."""
    return "write" if point.startswith("write:") else point


def pick(ref: Reference, rng: random.Random) -> tuple[str, int]:
    """A fault point of the reference run: a phase uniformly, then a point of it and one of
    its occurrences uniformly."""
    phases = sorted({phase(p) for p in ref.points})
    chosen = rng.choice(phases)
    names = sorted(p for p in ref.points if phase(p) == chosen)
    name = rng.choice(names)
    return name, rng.randint(1, ref.points[name])


@dataclass
class Killed:
    """One interrupted invocation: where, and whether the kill happened (a resumed run may have
    passed that point before it was killed earlier)."""

    target: str
    killed: bool


def killed_run(recipe: Path, out: Path, *, resume: bool, target: tuple[str, int] | None = None,
               after_s: float | None = None, trace: Path | None = None) -> Killed:  # fmt: skip
    """One invocation killed at fault point ``target`` (``NAME@N``) or ``after_s`` seconds in
    (a SIGKILL from outside, at any instruction); raises when it fails otherwise."""
    cmd = command(recipe, out, resume=resume)
    if target is not None:
        spec = f"{target[0]}@{target[1]}"
        extra = {faults.ENV_KILL: spec} | ({faults.ENV_TRACE: str(trace)} if trace else {})
        r = subprocess.run(cmd, env=env(**extra), capture_output=True, text=True,
                           timeout=900)  # fmt: skip
        code, err = r.returncode, r.stderr
    else:
        assert after_s is not None
        spec = f"after {after_s:.2f}s"
        extra = {faults.ENV_TRACE: str(trace)} if trace else {}
        p = subprocess.Popen(cmd, env=env(**extra), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            p.wait(timeout=after_s)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=900)
        code = p.returncode
    if code not in (0, -signal.SIGKILL):
        raise AssertionError(f"killed at {spec}, the run failed (exit {code}):\n{err[-4000:]}")
    return Killed(spec, code == -signal.SIGKILL)


def kill_through_phases(recipe: Path, out: Path, ref: Reference, rng: random.Random,
                        phases: list[str] | None = None, outside_s: float | None = None,
                        ) -> list[Killed]:  # fmt: skip
    """One run killed once in each phase of ``phases`` (default: all the reference's) and
    resumed after each kill. Each kill is a random point of the reference's trace in that
    phase, taken in the order the run reaches them; the invocations share one trace, so a
    point's count goes on across them (:mod:`potstill.faults`), and a target the redone work
    since the last checkpoint has already passed is left out. ``outside_s``: first a SIGKILL
    from outside that many seconds in. Returns the kills tried; the run is left to
    :func:`finish`."""
    picks = []
    for ph in phases or ref.phases():
        at = rng.choice([i for i, p in enumerate(ref.trace) if phase(p) == ph])
        name = ref.trace[at]
        picks.append((at, name, ref.trace[:at].count(name) + 1))
    trace = out.parent / f"{out.name}.kill-trace"
    trace.unlink(missing_ok=True)
    tried: list[Killed] = []
    if outside_s is not None:
        tried.append(killed_run(recipe, out, resume=False, after_s=outside_s, trace=trace))
        if not tried[-1].killed:
            return tried
    for _, name, n in sorted(picks):
        passed = trace.read_text().split("\n")[:-1].count(name) if trace.exists() else 0
        if passed >= n:
            continue
        k = killed_run(recipe, out, resume=bool(tried), target=(name, n), trace=trace)
        tried.append(k)
        if not k.killed:
            break
    return tried


def finish(recipe: Path, out: Path) -> dict[str, Any]:
    """Resume to the end; the fingerprint."""
    r = run(recipe, out, resume=True)
    if r.returncode != 0:
        raise AssertionError(f"the resumed run failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return fingerprint(out)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


# --- damaged files ----------------------------------------------------------------------------

DAMAGES = ("truncate", "flip", "delete")
NOT_READ = ("run.log", ".potstill.lock")
"""Files a resumed run never reads (a log it appends to, the lock): damage to them cannot
reach a result."""


def damage(file: Path, how: str) -> None:
    """Damage ``file``: cut it to half its size, flip one byte in its middle, or delete it."""
    if how == "delete":
        file.unlink()
        return
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        if not data:
            data = bytearray(b"\0")
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    else:
        raise ValueError(f"unknown damage {how!r}: one of {DAMAGES}")


def interrupted(recipe: Path, out: Path, ref: Reference) -> Path:
    """A run of ``recipe`` killed in the training of its last model, after that model's first
    checkpoint: every earlier part finished, one in progress (``out``)."""
    last = [p for p in ref.order if p.startswith("train:")][-1]
    k = killed_run(recipe, out, resume=False, target=(last, min(3, ref.points[last])))
    assert k.killed, f"the run was not killed at {last}"
    return out


def damage_targets(state: Path) -> list[Path]:
    """Every file of an interrupted run that a resume may read, by path."""
    return sorted(
        p.relative_to(state) for p in state.rglob("*")
        if p.is_file() and p.name not in NOT_READ and not p.name.endswith(".tmp")
    )  # fmt: skip


@dataclass
class Outcome:
    """What a resume made of one damaged file: ``named`` (the output names the file, the run
    rebuilt it and ended as the uninterrupted run, or stopped with exit 2 and the fix),
    ``unused`` (not named, and the run's results are those of an uninterrupted run: the file
    was not needed), or ``silent`` (not named, and something differs: a silent corruption)."""

    file: str
    how: str
    verdict: str
    code: int
    detail: str = ""


def _named(text: str, rel: Path) -> bool:
    # a message names the file by its path, or (a shard, a checkpoint) by its folder and name
    return (
        str(rel) in text
        or (rel.name in text and str(rel.parent) in text)
        or (rel.parent.name in text and rel.parent.name.startswith("step-"))
    )


def damage_case(recipe: Path, state: Path, work: Path, rel: Path, how: str,
                ref: Reference) -> Outcome:  # fmt: skip
    """Copy the interrupted run ``state`` to ``work``, damage its file ``rel`` by ``how``,
    resume it and judge the outcome (:class:`Outcome`)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(state, work, symlinks=True)
    damage(work / rel, how)
    r = run(recipe, work, resume=True)
    text = r.stdout + r.stderr
    named = _named(text, rel)
    if r.returncode not in (0, 2):  # a crash, not an answer
        return Outcome(str(rel), how, "silent", r.returncode, r.stderr[-600:])
    if r.returncode == 2:
        return Outcome(str(rel), how, "named" if named else "silent", 2, text.strip()[-300:])
    diff = differences(ref.fingerprint, fingerprint(work))
    diff = [d for d in diff if d != str(rel)]  # the damaged file itself, when left as it was
    if named:  # rebuilt (then the result is the uninterrupted one) or warned and left out
        return Outcome(str(rel), how, "named" if not diff else "silent", 0, ", ".join(diff))
    return Outcome(str(rel), how, "unused" if not diff else "silent", 0, ", ".join(diff)[:300])
