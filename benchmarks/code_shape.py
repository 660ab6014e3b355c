"""The shape of a potstill source tree: its largest files, the functions over 80 lines, and its
import circles (imports inside functions included), by the rules of tests/test_layering.py.

    python benchmarks/code_shape.py src/potstill
    git worktree add /tmp/old 4089819 && python benchmarks/code_shape.py /tmp/old/src/potstill
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_layering import circles, edges  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path, help="the package folder, e.g. src/potstill")
    parser.add_argument("--largest", type=int, default=5)
    a = parser.parse_args()
    files = sorted(a.package.rglob("*.py"))
    sizes = sorted(
        ((len(p.read_text().splitlines()), p.relative_to(a.package)) for p in files), reverse=True
    )
    print(f"{len(files)} files, {sum(n for n, _ in sizes):,} lines")
    print("largest: " + ", ".join(f"{p} {n}" for n, p in sizes[: a.largest]))
    print("over 400 lines: " + (", ".join(f"{p} {n}" for n, p in sizes if n > 400) or "none"))
    long = []
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append((n, f"{p.relative_to(a.package)}:{node.name}"))
    print(
        f"functions over 80 lines: {len(long)}: "
        + ", ".join(f"{f} {n}" for n, f in sorted(long, reverse=True))
    )
    found = circles(edges(a.package))
    print(f"import circles: {len(found)}" + "".join(f"\n  {' → '.join(c)}" for c in found))


if __name__ == "__main__":
    main()
