"""Advisory locks on folders potstill writes (a run folder, a teacher-cache part): a second
process that would write the same files is refused at once, naming the holder's pid and host.
The lock is an ``fcntl.flock`` on a small file whose text names the holder; the kernel drops it
when the holder's process ends however it ends (SIGKILL included), so a stale lock — its
process gone, its file still naming it — is simply taken over."""

from __future__ import annotations

import fcntl
import os
import platform
from pathlib import Path
from typing import IO


class Busy(ValueError):
    """Another process holds the lock: the message names it and what to do."""


def holder_text() -> str:
    """How a lock names this process: ``pid 1234 on host``."""
    return f"pid {os.getpid()} on {platform.node()}"


class Lock:
    """An exclusive lock on ``file`` (created, with its folder), taken at once or refused with
    ``error`` (:class:`Busy` or any exception taking one message) reading ``"{what} is in use
    by {by} (pid 1234 on host); {fix}"``. Release with :meth:`release` or ``with``."""

    def __init__(self, file: str | os.PathLike, what: str, fix: str, *,
                 by: str = "another potstill process", error: type[Exception] = Busy):  # fmt: skip
        self.file = Path(file)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle: IO[str] = open(self.file, "a+")  # noqa: SIM115  (held until release())
        except PermissionError:  # another account's lock file: flock works on a read handle
            handle = open(self.file)  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "its pid not yet written"
            handle.close()
            raise error(f"{what} is in use by {by} ({holder}); {fix}") from None
        except BaseException:
            handle.close()
            raise
        if handle.writable():
            handle.seek(0)
            handle.truncate()
            handle.write(holder_text() + "\n")
            handle.flush()
        self._handle: IO[str] | None = handle

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._handle is not None

    def release(self) -> None:
        """Release the lock (idempotent). The file stays: removing it would let a process that
        opened it before lock a file no longer in the folder."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["Busy", "Lock", "holder_text"]
