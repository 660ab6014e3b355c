"""Built-in text corpus: the entries of Debian's ``fortunes`` package (one file per category,
entries separated by ``%`` lines), folded, de-duplicated, in a fixed order."""

from __future__ import annotations

import os
from pathlib import Path

from .rows import Rows

FORTUNES_DIR = Path(os.environ.get("FORTUNES_DIR") or "/usr/share/games/fortunes")
"""Where the fortune files are: ``$FORTUNES_DIR``, else where Debian's ``fortunes`` puts them."""


def fortune_entries(
    folder: str | Path | None = None, *, min_chars: int = 20, max_chars: int = 400
) -> list[tuple[str, str]]:
    """``(category, text)`` for each entry of Debian's ``fortunes`` package (entries end at a
    ``%`` line; the category is the file name), whitespace folded, de-duplicated, in a fixed
    order (file name, then position). Files with a dot in their name (``.dat`` indexes, ``.u8``
    copies) are skipped."""
    d = Path(folder) if folder else FORTUNES_DIR
    files = sorted(
        p
        for p in d.glob("*")
        if p.is_file() and p.suffix not in (".dat", ".u8") and "." not in p.name
    )
    if not files:
        raise FileNotFoundError(
            f"no fortune files in {d}: install Debian's 'fortunes' package "
            "(apt-get install fortunes fortunes-min), or give their folder with --data-dir "
            "(data.folder) or the FORTUNES_DIR environment variable"
        )
    seen: set[str] = set()
    found = []
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        # an entry ends at a line holding only "%" (empty entries and a leading "%" happen)
        entries, current = [], []
        for line in lines:
            if line.strip() == "%":
                entries.append("\n".join(current))
                current = []
            else:
                current.append(line)
        entries.append("\n".join(current))
        for entry in entries:
            text = " ".join(entry.split())
            if min_chars <= len(text) <= max_chars and text not in seen:
                seen.add(text)
                found.append((path.name, text))
    return found


def load_fortunes(
    folder: str | Path | None = None, *, min_chars: int = 20, max_chars: int = 400
) -> list[str]:
    """The texts of :func:`fortune_entries`, without their categories."""
    return [text for _, text in fortune_entries(folder, min_chars=min_chars, max_chars=max_chars)]


def fortune_rows(
    folder: str | Path | None = None, *, min_chars: int = 20, max_chars: int = 400
) -> dict[str, Rows]:
    """Debian's fortunes as a data source: ``all`` rows with columns ``category`` (the file
    name) and ``text``, as :func:`fortune_entries` finds them."""
    entries = fortune_entries(folder, min_chars=min_chars, max_chars=max_chars)
    columns = {"category": [c for c, _ in entries], "text": [t for _, t in entries]}
    return {"all": Rows(columns, "fortunes")}
