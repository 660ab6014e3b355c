"""The fault soak: many kills, damaged files and bad inputs over every run kind, from the
command line in fresh processes, each checked against an uninterrupted run (the harness of
tests/test_fault_injection.py, ``tests/faultkit.py``).

- kills: runs of each kind killed once in every phase at random points (SIGKILL at a fault
  point of :mod:`potstill.faults`) plus at a random moment from outside, resumed after each;
  the finished run must equal the uninterrupted one (weights, caches, answers bit for bit;
  logged figures and results).
- damages: a run interrupted in its last model, one of its files cut to half, flipped in one
  byte or deleted, resumed: the damage must be named (rebuilt to the uninterrupted result, or a
  stop with exit 2 and the fix) or provably unused; never a silent difference.
- bad inputs: each a clear one-line error with exit 2, the run folder it aims at unchanged.

    .venv/bin/python benchmarks/soak.py --kills 200 --damages 30 --bad-inputs 20 --seed 0

Writes ``--json`` (default benchmarks/results/soak.json) as it goes and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import faultkit as fk  # noqa: E402
from badinputs import bad_input_cases  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=200, help="kills to reach (at least)")
    p.add_argument("--damages", type=int, default=30, help="damaged-file cases")
    p.add_argument("--bad-inputs", type=int, default=20, help="bad-input cases (at most all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="*", default=list(fk.KINDS))
    p.add_argument("--work", type=Path, default=Path("/tmp/potstill-soak"))
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    a = p.parse_args()
    rng = random.Random(a.seed)
    shutil.rmtree(a.work, ignore_errors=True)
    recipes = fk.recipes(a.work / "recipes")
    t0 = time.perf_counter()
    out: dict = {"command": " ".join(sys.argv), "seed": a.seed, "kinds": a.kinds}

    def save() -> None:
        out["wall_s"] = round(time.perf_counter() - t0)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))

    refs = {}
    for kind in a.kinds:
        refs[kind] = fk.reference(recipes[kind], a.work / f"reference-{kind}")
        print(f"reference {kind}: {refs[kind].seconds:.0f}s, phases {refs[kind].phases()}",
              flush=True)  # fmt: skip

    # --- kills
    kills = {"reached": 0, "tried": 0, "runs": 0, "unequal": [], "by_phase": {}}
    out["kills"] = kills
    n = 0
    while kills["reached"] < a.kills:
        kind = a.kinds[n % len(a.kinds)]
        ref, run = refs[kind], a.work / f"kill-{n}"
        n += 1
        tried = fk.kill_through_phases(recipes[kind], run, ref, rng,
                                       outside_s=rng.uniform(1.0, 0.6 * ref.seconds))  # fmt: skip
        got = fk.finish(recipes[kind], run)
        diff = fk.differences(ref.fingerprint, got)
        kills["runs"] += 1
        kills["tried"] += len(tried)
        kills["reached"] += sum(k.killed for k in tried)
        for k in tried:
            if k.killed:
                ph = "outside" if k.target.startswith("after") else fk.phase(k.target.split("@")[0])
                key = f"{kind} {ph.split(':')[0]}"
                kills["by_phase"][key] = kills["by_phase"].get(key, 0) + 1
        if diff:
            kills["unequal"].append({"kind": kind, "kills": [k.target for k in tried],
                                     "differs": diff})  # fmt: skip
        print(f"kills {kills['reached']}/{a.kills}: {kind} {[k.target for k in tried]} -> "
              f"{'EQUAL' if not diff else 'DIFFERS ' + str(diff)}", flush=True)  # fmt: skip
        shutil.rmtree(run, ignore_errors=True)
        save()

    # --- damaged files
    damages = {"cases": 0, "named": 0, "unused": 0, "silent": [], "list": []}
    out["damages"] = damages
    states = {}
    for kind in a.kinds:
        states[kind] = fk.interrupted(recipes[kind], a.work / f"state-{kind}", refs[kind])
    cases = [(kind, rel, how) for kind in a.kinds for rel in fk.damage_targets(states[kind])
             for how in fk.DAMAGES]  # fmt: skip
    for kind, rel, how in rng.sample(cases, min(a.damages, len(cases))):
        o = fk.damage_case(recipes[kind], states[kind], a.work / "damaged", rel, how, refs[kind])
        damages["cases"] += 1
        if o.verdict == "silent":
            damages["silent"].append({"kind": kind, **o.__dict__})
        else:
            damages[o.verdict] += 1
        damages["list"].append(f"{kind} {how} {rel}: {o.verdict} (exit {o.code})")
        print(f"damage {damages['cases']}: {kind} {how} {rel}: {o.verdict} (exit {o.code}) "
              f"{o.detail[-160:]!r}", flush=True)  # fmt: skip
        save()

    # --- bad inputs
    bad = {"cases": 0, "clear": 0, "failed": []}
    out["bad_inputs"] = bad
    for case in bad_input_cases(a.work / "bad", recipes, refs)[: a.bad_inputs]:
        ok, why = case.check()
        bad["cases"] += 1
        bad["clear"] += ok
        if not ok:
            bad["failed"].append({"case": case.name, "why": why})
        print(f"bad input {bad['cases']}: {case.name}: {'clear' if ok else 'FAILED ' + why}",
              flush=True)  # fmt: skip
        save()
    save()
    print(json.dumps({k: v for k, v in out.items() if k != "damages"} | {
        "damages": {k: v for k, v in damages.items() if k != "list"}}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
