"""Sealed folders: a folder potstill writes for later reuse (a trained model, an export) gets a
``SHA256SUMS`` file with the SHA-256 of every file in it, in the format ``sha256sum -c`` checks.
Whoever reuses the folder verifies it first, so a damaged file is named instead of used."""

from __future__ import annotations

import os
from pathlib import Path

from . import faults
from .io import atomic_write_text, sha256_file

SUMS_FILE = "SHA256SUMS"
UNSEALED = frozenset({SUMS_FILE, "README.md"})
"""Top-level files a seal leaves out: itself, and the model card (reports rewrite it)."""


class DamagedFolder(ValueError):
    """A sealed folder's files are missing or differ from their checksums."""


def _files(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in UNSEALED and not path.name.endswith(".tmp"):
            out.append(rel)
    return out


def seal(folder: str | os.PathLike, point: str = "export") -> Path:
    """Write ``folder/SHA256SUMS`` for every file under ``folder`` (but the model card);
    returns its path. ``point`` names the fault point reached before (see :mod:`.faults`)."""
    folder = Path(folder)
    faults.point(point)  # the folder's files are written, not yet sealed
    lines = [f"{sha256_file(folder / rel)}  {rel}\n" for rel in _files(folder)]
    return atomic_write_text(folder / SUMS_FILE, "".join(lines))


def is_sealed(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a ``SHA256SUMS``."""
    return (Path(folder) / SUMS_FILE).is_file()


def damage(folder: str | os.PathLike) -> list[str]:
    """What is wrong with sealed ``folder``: each file missing or differing from its checksum,
    and each file added since (a weights file that is not in the seal); [] when it is intact."""
    folder = Path(folder)
    sums = folder / SUMS_FILE
    try:
        text = sums.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [f"{sums} cannot be read ({e})"]
    listed: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel:
            return [f"{sums}:{n} is not a checksum line (the file is damaged)"]
        listed[rel] = digest
    problems = []
    for rel, digest in listed.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path} differs from its checksum in {SUMS_FILE}")
    problems += [
        f"{folder / rel} is not in {SUMS_FILE} (added after the folder was written)"
        for rel in _files(folder)
        if rel not in listed and rel.endswith((".safetensors", ".bin", ".pt", ".json"))
    ]
    return problems


def verify(folder: str | os.PathLike, who: str = "model folder") -> None:
    """Raise :class:`DamagedFolder` naming every damaged file when sealed ``folder`` is not
    intact; a folder without ``SHA256SUMS`` (not written by potstill) passes as it is."""
    if not is_sealed(folder):
        return
    problems = damage(folder)
    if problems:
        raise DamagedFolder(
            f"{who} {folder} is damaged: {'; '.join(problems)}. Restore the folder from a "
            f"copy, or write it again (a run's own parts: rerun with --resume, which rebuilds "
            f"them); `sha256sum -c {SUMS_FILE}` in the folder checks it"
        )


__all__ = ["SUMS_FILE", "DamagedFolder", "damage", "is_sealed", "seal", "verify"]
