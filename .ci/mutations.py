"""Mutation check (issue 23): apply one plausible bug at a time to src/, run the test meant to
catch it, restore the file. Every line should read CAUGHT; a SURVIVED line is a feature whose
tests pass with it switched off.

    .venv/bin/python .ci/mutations.py            every mutation (about 3 minutes)
    .venv/bin/python .ci/mutations.py M4 M7      some of them
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, file, code as it is, code with the bug, the tests that must then fail)
MUTATIONS = [
    (
        "M1 FSDP falls back to DDP",
        "src/potstill/distiller.py",
        'self.fsdp = self.world > 1 and self.cfg.distributed == "fsdp"',
        "self.fsdp = False",
        ["tests/test_distributed.py::test_fsdp_student_and_sharded_teacher_equal_one_process"],
    ),
    (
        "M2 LiveTeacher(shard=True) does nothing",
        "src/potstill/teachers.py",
        "        if distributed.world_size() > 1:\n"
        "            distributed.shard_blocks(self.model)",
        "        if False:\n            distributed.shard_blocks(self.model)",
        ["tests/test_distributed.py::test_fsdp_student_and_sharded_teacher_equal_one_process"],
    ),
    (
        "M3 the causal-LM recipe ignores fused_head",
        "src/potstill/runs/causal_lm.py",
        "forward = causal_lm_hidden_forward if recipe.fused_head else TASK.student_forward",
        "forward = TASK.student_forward",
        ["tests/test_llm_pipeline.py::test_fused_head_recipe"],
    ),
    (
        "M4 last.json published and the old checkpoint dropped before the new files exist",
        "src/potstill/checkpoints.py",
        '    atomic_save_module(student, folder / "student.safetensors")',
        '    atomic_write_text(root / "last.json", '
        'json.dumps({"dir": folder.name, "step": step}))\n'
        "    for old in checkpoint_folders(run_dir)[kept:]:\n"
        "        shutil.rmtree(old, ignore_errors=True)\n"
        '    atomic_save_module(student, folder / "student.safetensors")',
        [
            "tests/test_distiller.py::"
            "test_a_save_that_fails_midway_leaves_the_previous_checkpoint_in_force"
        ],
    ),
    (
        "M5 the cache's shard-header check off",
        "src/potstill/cache/reader.py",
        '            if meta.get("cache_id") != self.manifest["cache_id"] or meta.get("shard") '
        "!= str(j):",
        "            if False:",
        ["tests/test_cache.py::test_damaged_missing_and_foreign_shards_are_named"],
    ),
    (
        "M6 accumulation as a mean of the micro-batches' own means",
        "src/potstill/distiller.py",
        "                share = counts / totals if self._weigh else None",
        "                share = torch.full_like(counts, 1 / cfg.grad_accum) "
        "if self._weigh else None",
        ["tests/test_distiller.py::test_grad_accum_equals_one_big_batch"],
    ),
    (
        "M7 compressed cache rows: ids sorted, their log-probabilities left in place",
        "src/potstill/cache/codec.py",
        '    values = rows["logprobs"].gather(-1, order)',
        '    values = rows["logprobs"]',
        ["tests/test_cache.py::test_recipe_with_the_default_top_k_cache_trains_close_to_live"],
    ),
    (
        "M8 the answers' teacher log-likelihood skips each answer's first token",
        "src/potstill/llm/evaluate.py",
        "            scored = next_token_mask(mask, prompt_lengths=lengths)",
        "            scored = next_token_mask(mask, prompt_lengths=lengths + 1)",
        ["tests/test_responses.py::test_answer_scores_equal_a_plain_transformers_computation"],
    ),
    (
        "M9 the Distiller does not hand a served teacher the next step's batches",
        "src/potstill/distiller.py",
        "            self._prefetch(micro + cfg.grad_accum)",
        "            pass",
        [
            "tests/test_served.py::"
            "test_the_next_steps_teacher_answers_are_asked_for_while_this_step_trains"
        ],
    ),
]


def main(which: list[str]) -> int:
    survived = 0
    for name, file, old, new, tests in MUTATIONS:
        if which and name.split()[0] not in which:
            continue
        path = ROOT / file
        src = path.read_text()
        if src.count(old) != 1:
            print(f"{name}: the code to mutate is not in {file} once; update this script")
            return 2
        path.write_text(src.replace(old, new))
        try:
            t = time.time()
            r = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                capture_output=True, text=True, cwd=ROOT,
            )  # fmt: skip
            first = [x for x in r.stdout.splitlines() if x.startswith(("E   ", "FAILED"))][:2]
            verdict = "CAUGHT" if r.returncode else "SURVIVED"
            survived += not r.returncode
            print(f"{name}: {verdict} ({time.time() - t:.0f} s) {first}", flush=True)
        finally:
            path.write_text(src)
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
