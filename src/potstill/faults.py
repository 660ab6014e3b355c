"""Fault injection for potstill's own fault tests and soak benchmark: named points in the run
machinery (each training step, each file written atomically, each teacher-cache shard, each
batch of teacher answers, each export, each report) where, asked through the environment, the
process is SIGKILLed or a write fails as on a full disk. Unset, a point costs one dictionary
look-up.

- ``POTSTILL_FAULT_TRACE=FILE``: append each point reached to ``FILE``, one name a line.
- ``POTSTILL_FAULT_KILL=NAME@N``: SIGKILL this process at the ``N``-th time (from 1) point
  ``NAME`` is reached. With a trace, the count goes on from the times ``FILE`` already
  records, so one target can be aimed across a run killed and resumed several times.
- ``POTSTILL_FAULT_ENOSPC=NAME@N``: the ``N``-th atomic write at point ``NAME`` (``write:…``)
  fails with ``ENOSPC``, as on a full disk.

Point names: ``train:<model>`` (after each optimizer step and its checkpoint), ``write:<file>``
(a file written atomically, before it replaces the old one; digits in the file name read
``#``), ``cache`` (a teacher-cache shard written, before its record), ``answers`` (a batch of
teacher answers appended), ``export`` (a model's files written, before their seal), ``best``
(a best evaluation's copy written, before its seal), ``report`` (before a report is
written)."""

from __future__ import annotations

import errno
import os
import re
import signal

ENV_TRACE = "POTSTILL_FAULT_TRACE"
ENV_KILL = "POTSTILL_FAULT_KILL"
ENV_ENOSPC = "POTSTILL_FAULT_ENOSPC"

_counts: dict[str, int] = {}


def _target(env: str) -> tuple[str, int] | None:
    spec = os.environ.get(env)
    if not spec:
        return None
    name, sep, n = spec.rpartition("@")
    if not sep or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{env} must look like NAME@N (N from 1), got {spec!r}")
    return name, int(n)


def write_point(file: str) -> str:
    """The point name of an atomic write of ``file`` (its name, digits as ``#``)."""
    return "write:" + re.sub(r"\d", "#", os.path.basename(file))


def point(name: str) -> None:
    """Reach fault point ``name``: traced, and SIGKILLed or failed when the environment asks
    (see the module doc)."""
    if not (ENV_TRACE in os.environ or ENV_KILL in os.environ or ENV_ENOSPC in os.environ):
        return
    trace = os.environ.get(ENV_TRACE)
    if not _counts and trace and os.path.exists(trace):  # earlier invocations' points
        with open(trace, encoding="utf-8") as f:
            for line in f.read().splitlines():
                _counts[line] = _counts.get(line, 0) + 1
        _counts[""] = 0  # (read once)
    n = _counts[name] = _counts.get(name, 0) + 1
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if _target(ENV_KILL) == (name, n):
        os.kill(os.getpid(), signal.SIGKILL)
    if _target(ENV_ENOSPC) == (name, n):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


__all__ = ["ENV_ENOSPC", "ENV_KILL", "ENV_TRACE", "point", "write_point"]
