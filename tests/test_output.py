"""Honest output (the fault issue, item 6): a bar on a terminal, plain periodic lines (count,
rate, ETA, figures) elsewhere, evaluation included, and every run folder's ``run.log`` holding
what was printed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_mlp, quiet_config

from potstill.distiller import Distiller
from potstill.losses.terms import labels_only_objective
from potstill.progress import ENV_EVERY, Progress, add_sink, duration, remove_sink


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setenv(ENV_EVERY, "0")  # a plain line at each update


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "potstill"]


def test_plain_lines_off_a_terminal_count_rate_eta_and_figures(every_update, caplog):
    caplog.set_level(logging.INFO, "potstill")
    p = Progress(10, "distill", "step")  # pytest's stderr is not a terminal
    assert p.bar is None
    for i in range(3):
        p.set_postfix({"loss": f"{1 / (i + 1):.3g}"})
        p.update(1)
    p.update(7)
    p.close()
    lines = _lines(caplog)
    assert lines[0].startswith("distill: step 1/10 (10%), ") and lines[0].endswith(", loss 1")
    assert "step/s, ETA " in lines[0]
    assert lines[2].startswith("distill: step 3/10 (30%), ") and lines[2].endswith("loss 0.333")
    assert lines[-1].startswith("distill: step 10/10 (100%), ") and ", done in " in lines[-1]
    assert len(lines) == 4  # one per update; the end said nothing new
    p.close()
    assert len(_lines(caplog)) == 4  # nor does closing twice


def test_lines_are_spaced_by_the_interval(monkeypatch, caplog):
    monkeypatch.setenv(ENV_EVERY, "3600")
    caplog.set_level(logging.INFO, "potstill")
    p = Progress(100, "cache", "ex")
    for _ in range(100):
        p.update(1)
    p.close()
    assert _lines(caplog) == [_lines(caplog)[0]] and "ex 100/100 (100%)" in _lines(caplog)[0]
    monkeypatch.setenv(ENV_EVERY, "soon")
    with pytest.raises(ValueError, match=ENV_EVERY):
        Progress(1, "x")


def test_disabled_or_not_rank_0_is_silent_and_a_bar_copies_lines_only_to_run_logs(
    every_update, caplog, capsys, tmp_path
):
    caplog.set_level(logging.INFO, "potstill")
    for kw in ({"enabled": False}, {"show": False}):
        with Progress(5, "quiet", **kw) as p:
            p.update(5)
    assert _lines(caplog) == []
    sink = logging.FileHandler(tmp_path / "run.log")
    add_sink(sink)
    try:
        with Progress(4, "bar", "step", enabled=True) as p:  # a bar, as on a terminal
            p.update(4)
    finally:
        remove_sink(sink)
        sink.close()
    assert _lines(caplog) == []  # the console has the bar, not the lines
    assert "\rbar:   0%|" in capsys.readouterr().err  # tqdm's bar
    logged = (tmp_path / "run.log").read_text().splitlines()
    assert len(logged) == 1 and logged[0].startswith("bar: step 4/4 (100%)")


def test_duration():
    assert [duration(s) for s in (4.4, 65, 3600 * 2 + 7 * 60)] == ["4s", "1m05s", "2h07m"]


def test_the_distiller_logs_plain_lines_with_losses_off_a_terminal(digits, every_update, caplog):
    caplog.set_level(logging.INFO, "potstill")
    cfg = quiet_config(max_steps=4, batch_size=64, progress=None, log_every=2)
    Distiller(make_mlp([8]), labels_only_objective(), digits.train, config=cfg,
              name="student").fit()  # fmt: skip
    lines = [x for x in _lines(caplog) if x.startswith("student: step ")]
    assert lines[0].startswith("student: step 1/4 (25%)") and "ETA" in lines[0]
    assert any(x.startswith("student: step 2/4 (50%)") and ", ce " in x for x in lines)
    assert lines[-1].startswith("student: step 4/4 (100%)") and "done in" in lines[-1]


def test_causal_lm_evaluation_reports_progress(tok, every_update, caplog):
    from test_llm_pipeline import tiny_llama, val_dataset

    from potstill.llm.evaluate import lm_figures

    caplog.set_level(logging.INFO, "potstill")
    lm_figures({"m": tiny_llama(len(tok))}, val_dataset(tok), batch_size=2)
    lines = [x for x in _lines(caplog) if x.startswith("evaluating: ")]
    assert lines[0].startswith("evaluating: batch 1/3 (33%)")
    assert lines[-1].startswith("evaluating: batch 3/3 (100%)")


RECIPE = {
    "name": "output-digits",
    "data": {"name": "digits", "val_size": 158},
    "teacher": {"arch": {"hidden": [32]}, "train": {"max_steps": 6, "batch_size": 64}},
    "student": {"arch": {"hidden": [8]}},
    "train": {"max_steps": 6, "batch_size": 64, "log_every": 2, "eval_every": 3},
    "evaluation": {"measure_cache_speedup": False},
}


def test_a_cli_run_off_a_terminal_prints_plain_lines_and_keeps_them_in_run_log(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = {**os.environ, ENV_EVERY: "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "potstill.cli", "distill", str(recipe), "--out",
           str(tmp_path / "run")]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout + out.stderr
    assert "\r" not in printed  # no bar redrawn into a log file
    for who in ("teacher", "baseline", "distilled"):
        assert f"{who}: step 6/6 (100%)" in printed, who
    log = (tmp_path / "run" / "run.log").read_text()
    assert log.splitlines()[0].endswith(f"starting {tmp_path / 'run'}")
    for line in out.stderr.splitlines():  # all potstill printed, each line with a time stamp
        if line.strip():
            assert line in log, line
    assert "report:" in out.stdout and "report:" in log  # the summary too
    # resumed: appended, not replaced
    again = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    log2 = Path(tmp_path / "run" / "run.log").read_text()
    assert log2.startswith(log) and f"resuming {tmp_path / 'run'}" in log2


def test_run_log_names_the_error_a_run_stopped_on(tmp_path):
    from potstill.recipe import load_recipe
    from potstill.runs.folder import RunFolder

    with pytest.raises(ValueError, match="boom"):
        with RunFolder(tmp_path / "run", load_recipe("default")):
            logging.getLogger("potstill").warning("a warning on the way")
            raise ValueError("boom")
    lines = (tmp_path / "run" / "run.log").read_text().splitlines()
    assert lines[1].endswith(" a warning on the way")
    assert lines[-1].endswith(" stopped: ValueError('boom')")
    logging.getLogger("potstill").warning("after the run")  # the file is closed and detached
    assert "after the run" not in (tmp_path / "run" / "run.log").read_text()
