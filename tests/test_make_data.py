"""The Makefile's data step (``.ci/data-package``): nothing to do when the files are there, no
install into a folder the user named, and without root the exact command to run — never a
sudo prompt."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "data-package"


def step(tmp_path: Path, files: str, debian: str, user: str | None = None):
    env = {**os.environ, "FILES": files, "DEBIAN_FILES": debian, "PKG": "some-package",
           "WHAT": "the data (X_DIR=somewhere)"}  # fmt: skip
    cmd = ["sh", str(SCRIPT)]
    if user:  # a copy another account can read (the checkout and tmp_path may be private)
        shared = Path(tempfile.mkdtemp(prefix="potstill-data-step-"))
        os.chmod(shared, 0o755)
        shutil.copy(SCRIPT, shared / SCRIPT.name)
        os.chmod(shared / SCRIPT.name, 0o755)
        cmd = ["su", user, "-s", "/bin/sh", "-c", f"sh {shared / SCRIPT.name}"]
        tmp_path = shared
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)


def test_files_that_are_there_need_nothing(tmp_path):
    (tmp_path / "f.gz").write_bytes(b"x")
    out = step(tmp_path, str(tmp_path / "f.gz"), "/usr/share/none/f.gz")
    assert out.returncode == 0 and out.stdout == out.stderr == ""


def test_a_folder_the_user_named_is_never_installed_into(tmp_path):
    out = step(tmp_path, str(tmp_path / "missing.gz"), "/usr/share/none/f.gz")
    assert out.returncode == 1
    assert "missing.gz not found; point the variable at the folder that holds it" in out.stderr
    assert "installing" not in out.stdout


@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("su") and shutil.which("apt-get")),
    reason="needs root, su and apt-get",
)
def test_without_root_it_prints_the_command_instead_of_asking_for_a_password(tmp_path):
    out = step(tmp_path, "/usr/share/none/f.gz", "/usr/share/none/f.gz", user="nobody")
    assert out.returncode == 1
    assert "sudo apt-get install -y some-package" in out.stderr
    assert "FMNIST_DIR=" in out.stderr  # and how to point at files elsewhere
