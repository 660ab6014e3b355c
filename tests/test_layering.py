"""The house is one road: a layering check over ``src/potstill`` with plain ``ast``.

It fails when there is an import circle (imports inside functions included); when anything below
the runners imports the runners (``runs/``), the recipe package or the CLI; when the currency
(``signal``), the losses, the teacher sources or the cache import the training loop or the
package ``__init__``; when a module imports another module's private (``_name``) definitions.
The checker is tested on small trees that break each rule. Names that the benchmarks and the
docs import from potstill must exist."""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

TOP = ("potstill.runs", "potstill.recipe", "potstill.cli")
"""Only these may import the runners, the recipe package and the CLI (the recipe package may
import itself; the runners and the CLI import recipes)."""
LOWER_ROOMS = ("potstill.signal", "potstill.losses", "potstill.teachers", "potstill.cache")
"""Below the loop: they may import neither the loop nor the package ``__init__``'s names."""
LOOP = "potstill.distiller"


@dataclass(frozen=True)
class Import:
    """One imported name: ``module`` (absolute) and ``name`` (None for ``import module``)."""

    source: str
    module: str
    name: str | None
    line: int


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, src: Path) -> Iterator[Import]:
    """Every import of a file, module-level and inside functions, made absolute."""
    mod = module_name(path, src)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield Import(mod, a.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                yield Import(mod, target, a.name, node.lineno)


def modules(src: Path) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def edges(src: Path) -> dict[str, set[str]]:
    """Module → the package modules it imports (a ``from package import submodule`` counts as
    importing the submodule, not the package)."""
    known = modules(src)
    out: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        for imp in imports(path, src):
            sub = f"{imp.module}.{imp.name}" if imp.name else None
            target = sub if sub in known else imp.module
            if target in known and target != mod:
                out[mod].add(target)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _within(mod: str, rooms: tuple[str, ...]) -> bool:
    return any(mod == r or mod.startswith(r + ".") for r in rooms)


def violations(src: Path, package: str = "potstill") -> list[str]:
    """Every broken rule, one line each."""
    known = modules(src)
    graph = edges(src)
    out = [f"import circle: {' → '.join(c)}" for c in circles(graph)]
    top = tuple(t.replace("potstill", package, 1) for t in TOP)
    lower = tuple(r.replace("potstill", package, 1) for r in LOWER_ROOMS)
    loop = LOOP.replace("potstill", package, 1)
    for mod, targets in graph.items():
        for t in sorted(targets):
            if _within(t, top) and not _within(mod, top):
                out.append(f"{mod} imports {t}: below the runners, it may not import them")
            if _within(mod, lower) and t == loop:
                out.append(f"{mod} imports the training loop {t}")
    for mod, path in known.items():
        for imp in imports(path, src):
            if imp.name is None:
                continue
            is_module = f"{imp.module}.{imp.name}" in known
            if _within(mod, lower) and imp.module == package and not is_module:
                out.append(f"{mod}:{imp.line} imports {imp.name!r} from the package __init__")
            private = imp.name.startswith("_") and not imp.name.startswith("__")
            if private and not is_module and imp.module in known and imp.module != mod:
                out.append(f"{mod}:{imp.line} imports the private {imp.module}.{imp.name}")
    return out


def test_potstill_keeps_its_layers():
    found = violations(SRC / "potstill")
    assert found == [], "\n".join(found)


def test_every_package_module_is_seen():
    # the check reads every module (so none escapes it), subpackages included
    names = modules(SRC / "potstill")
    assert {"potstill.runs.chain", "potstill.cache.reader", "potstill.losses.forms"} <= set(names)
    assert len(names) > 60


# --- the checker catches what it should (small trees that break one rule each) -------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for rel, text in files.items():
        path = src / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [p for p in (src / "pkg").rglob("*") if p.is_dir()] + [src / "pkg"]:
        (folder / "__init__.py").touch()
    return src / "pkg"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.py": "from .b import x\n", "b.py": "def f():\n    from .a import y\n"},
         "import circle: pkg.a → pkg.b"),
        ({"evaluate.py": "from .runs.classic import run\n", "runs/classic.py": ""},
         "pkg.evaluate imports pkg.runs.classic: below the runners"),
        ({"models.py": "from .recipe import load\n", "recipe/__init__.py": ""},
         "pkg.models imports pkg.recipe: below"),
        ({"report/page.py": "from .. import cli\n", "cli.py": ""},
         "pkg.report.page imports pkg.cli: below"),
        ({"losses/terms.py": "from ..distiller import Distiller\n", "distiller.py": ""},
         "pkg.losses.terms imports the training loop pkg.distiller"),
        ({"cache/reader.py": "from .. import __version__\n"},
         "pkg.cache.reader:1 imports '__version__' from the package __init__"),
        ({"teachers.py": "from .data import _hash\n", "data.py": "def _hash(): ...\n"},
         "pkg.teachers:1 imports the private pkg.data._hash"),
    ],
)  # fmt: skip
def test_the_checker_finds_each_broken_rule(tmp_path, files, expected):
    found = violations(_tree(tmp_path, files), package="pkg")
    assert any(line.startswith(expected) for line in found), found


def test_the_checker_accepts_what_is_allowed(tmp_path):
    files = {
        "runs/classic.py": "from ..recipe.classic import R\nfrom ..report import write\n",
        "recipe/classic.py": "from ..losses.terms import build\n",
        "report/__init__.py": "from . import page\n",
        "report/page.py": "",
        "losses/terms.py": "from .. import signal\nfrom ..signal import TopK\n",
        "signal.py": "",
        "cli.py": "def f():\n    from .runs import run\n",
        "cache/reader.py": "from .._version import __version__\n",
        "_version.py": "",
    }
    assert violations(_tree(tmp_path, files), package="pkg") == []


# --- what the benchmarks and the docs import exists ----------------------------------------


def _doc_imports() -> Iterator[tuple[str, str, str]]:
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("potstill"):
                for a in node.names:
                    yield str(path.relative_to(ROOT)), node.module, a.name
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in re.finditer(r"^\s*from (potstill[\w.]*) import ([^\n#]+)", path.read_text(), re.M):
            for name in re.split(r"[,\s()]+", m.group(2)):
                if name and name != "\\":
                    yield str(path.relative_to(ROOT)), m.group(1), name


@pytest.mark.parametrize(("where", "module", "name"), sorted(set(_doc_imports())))
def test_names_benchmarks_and_docs_import_exist(where, module, name):
    mod = importlib.import_module(module)
    if not hasattr(mod, name):
        importlib.import_module(f"{module}.{name}")  # a submodule


HYPOTHETICAL = {"potstill.data.measurements", "potstill.runs.my_kind"}
"""Files the layout's worked examples tell you to add: they do not exist."""


def _doc_references() -> list[str]:
    found = set()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        # a dotted name after "." or "/" is a file (.potstill.lock), not a module
        found |= set(re.findall(r"(?<![\w./])potstill(?:\.[A-Za-z_]+)+", path.read_text()))
    return sorted(found - HYPOTHETICAL)


@pytest.mark.parametrize("ref", _doc_references())
def test_dotted_names_in_the_docs_exist(ref):
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    for name in parts[i:]:
        assert hasattr(obj, name), f"{ref}: {name!r} not found"
        obj = getattr(obj, name)
