"""Locks (the fault issue, item 3): a second process on a run folder or on a teacher-cache part
is refused at once naming the holder's pid and host; a lock whose process died (SIGKILL) is
taken over; the lock of one part does not block another part. Holders are real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from potstill.cache import write_cache
from potstill.cache.format import CacheError
from potstill.locks import Busy, Lock, holder_text
from potstill.recipe import load_recipe
from potstill.recipe.common import RecipeError
from potstill.runs.folder import LOCK_FILE, RunFolder

HOLD = textwrap.dedent(
    """
    import sys
    from potstill.locks import Lock
    lock = Lock(sys.argv[1], "the test folder", "wait", by="the holder")
    print("held", flush=True)
    if sys.argv[2] == "die":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # hold until the test closes stdin
    """
)


def hold(file: Path, then: str = "wait") -> subprocess.Popen:
    """A process holding ``Lock(file)`` (``then="die"``: SIGKILLed right after taking it)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(file), then], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def release(p: subprocess.Popen) -> None:
    assert p.stdin is not None
    p.stdin.close()
    assert p.wait(timeout=30) == 0


def test_a_lock_held_by_another_process_is_refused_naming_it(tmp_path):
    p = hold(tmp_path / "x.lock")
    try:
        with pytest.raises(Busy, match=rf"^the test folder is in use by the holder \(pid {p.pid} "
                           r"on [^)]+\); wait$"):  # fmt: skip
            Lock(tmp_path / "x.lock", "the test folder", "wait", by="the holder")
    finally:
        release(p)
    with Lock(tmp_path / "x.lock", "the test folder", "wait") as lock:  # free once released
        assert lock.held
        assert (tmp_path / "x.lock").read_text().strip() == holder_text()
    assert not lock.held


def test_a_stale_lock_whose_process_was_killed_is_taken_over(tmp_path):
    p = hold(tmp_path / "x.lock", "die")
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert (tmp_path / "x.lock").read_text().strip().startswith(f"pid {p.pid} ")  # still named
    with Lock(tmp_path / "x.lock", "the test folder", "wait"):
        assert (tmp_path / "x.lock").read_text().strip() == f"pid {os.getpid()} on {os.uname()[1]}"


def test_a_second_cli_run_on_a_folder_in_use_exits_2_naming_the_holder(tmp_path):
    from potstill.cli import app

    out = tmp_path / "run"
    RunFolder(out, load_recipe("default")).close()  # a run folder, started earlier
    before = sorted(x.name for x in out.iterdir())
    p = hold(out / LOCK_FILE)
    try:
        r = CliRunner().invoke(app, ["distill", "default", "--out", str(out), "--resume"])
    finally:
        release(p)
    assert r.exit_code == 2, r.output
    assert f"{out} is in use by a potstill run (pid {p.pid} on " in r.output
    assert sorted(x.name for x in out.iterdir()) == before  # nothing written or removed


def test_a_run_folder_lock_is_free_again_after_a_killed_run(tmp_path):
    p = hold(tmp_path / "run" / LOCK_FILE, "die")
    p.wait(timeout=30)
    with RunFolder(tmp_path / "run", load_recipe("default")) as folder:
        assert folder.path == tmp_path / "run"
        with pytest.raises(RecipeError, match=rf"in use by a potstill run \(pid {os.getpid()} "):
            RunFolder(tmp_path / "run", load_recipe("default"), resume=True)


def test_a_cache_part_in_use_is_refused_while_another_part_is_written(digits, tmp_path):
    from conftest import make_mlp

    teacher = make_mlp([16], seed=1)
    cache = tmp_path / "cache"
    p = hold(cache / "parts" / "part-00000-of-00002.lock")
    try:
        with pytest.raises(CacheError, match=rf"part 0/2 is in use by another cache writer "
                           rf"\(pid {p.pid} on .*give this process another --shard"):  # fmt: skip
            write_cache(teacher, digits.train, cache, part=(0, 2), shard_size=256)
        status = write_cache(teacher, digits.train, cache, part=(1, 2), shard_size=256)
        assert status.done and not status.complete  # part 1 wrote its shards alongside
    finally:
        release(p)
    status = write_cache(teacher, digits.train, cache, part=(0, 2), shard_size=256)
    assert status.complete
