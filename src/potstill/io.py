"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename, so a
crash never leaves a half-written checkpoint or cache that reads as valid."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model
from torch import nn

from . import faults
from .placement import cpu_state


def _umask() -> int:
    """The process's umask: from /proc on Linux (no change to it), else read by setting it and
    setting it back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` with the mode a plain ``open`` would give it
    (0666 less the umask: readable by whoever the user's umask lets read), not mkstemp's 0600,
    so a cache or run folder meant to be shared can be read by the others."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: OSError, path: Path) -> OSError:
    """The error of a write that found the disk (or the quota) full, naming the file, its
    folder and what to do; nothing written before is touched."""
    return OSError(
        e.errno,
        f"{os.strerror(e.errno or errno.ENOSPC)} writing {path.name} in {path.parent}: free "
        "space there (or point the run elsewhere) and run again with --resume; the files "
        "written before are intact",
    )


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # writers that recreate the file (safetensors) too
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        faults.point(faults.write_point(path.name))
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in FULL:
            raise disk_full(e, path) from e
        raise
    return path


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write tensors to a safetensors file atomically."""
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically. Only plain containers of tensors and numbers go in, so the file
    loads with ``torch.load(weights_only=True)``."""
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_create_text(path: str | os.PathLike, text: str) -> bool:
    """Write a text file atomically only if ``path`` does not exist yet; False (and ``path``
    untouched) when it does, even if another process creates it at the same moment: the
    complete file is hard-linked into place, which fails when the name is taken."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return _atomic(path, write)


CHECK_KEY = "check"
"""The key of a JSON-lines record's own checksum (teacher answers, metrics rows)."""


def record_check(record: dict) -> str:
    """A record's checksum: the SHA-256 (first 16 hex digits) of its JSON (sorted keys)
    without :data:`CHECK_KEY`; a changed byte in a line of a JSON-lines file shows."""
    import json

    body = {k: v for k, v in record.items() if k != CHECK_KEY}
    text = json.dumps(body, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_save_module(
    module: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write a module's state dict to safetensors atomically (tied weights stored once). A
    module on an accelerator is copied to the CPU tensor by tensor, each tied weight once (the
    other names of a tied group are recorded in the metadata; the file is the one
    ``save_model`` writes on the CPU; :func:`load_module` restores them)."""
    state = cpu_state(module)
    if state is None:
        return _atomic(path, lambda tmp: save_model(module, tmp, metadata=metadata))
    meta = dict(metadata or {})
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for names in groups.values():
        keep = min(names)  # the name save_model keeps: the same file from any device
        tensors[keep] = state[keep].contiguous()
        for other in sorted(names):
            if other != keep:
                meta.setdefault(other, keep)
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta or None))


def load_module(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by :func:`atomic_save_module` into ``module``, wherever its weights
    live (each tensor is copied onto its parameter's device); a tied weight stored once fills
    every name it is tied to. Raises ValueError naming the file and the names that do not fit."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    untied = [k for k in missing if meta.get(k) not in tensors]
    if untied or unexpected:
        raise ValueError(
            f"{path}: the weights do not fit the model (missing: {untied[:5]}, unexpected: "
            f"{unexpected[:5]}); it was written for another model"
        )
    return module
