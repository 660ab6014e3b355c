"""The package as users get it: ``python -m build`` makes a wheel that holds the code, the
built-in recipes and the ``potstill`` command; installed into a fresh virtual environment it
runs ``potstill --help``, lists the recipes and runs a small distillation from its own files
(its dependencies are the ones this environment installed, reached through a path file, so
the test needs no download)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from test_gpu_road import DIGITS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_and_distills_in_a_fresh_environment(tmp_path):
    pytest.importorskip("build")
    cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(ROOT)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "deprecated" not in built.stderr
    [wheel] = (tmp_path / "dist").glob("potstill-*.whl")
    env = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    py = env / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                         capture_output=True, text=True)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(site) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    where = subprocess.run([str(py), "-c", "import potstill; print(potstill.__file__)"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert where.startswith(site)  # the wheel's copy, not this checkout's
    cli = env / "bin" / "potstill"
    helped = subprocess.run([str(cli), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "distill" in helped.stdout
    listed = subprocess.run([str(cli), "recipes"], capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.startswith("default ")
    recipe = tmp_path / "digits.yaml"
    recipe.write_text(yaml.safe_dump(DIGITS))
    run = subprocess.run([str(cli), "distill", str(recipe), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["settings"][0]["runs"]["distilled"]["accuracy"] > 0.1
