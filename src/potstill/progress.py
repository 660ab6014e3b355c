"""Progress of long work (training, teacher caches, answers, evaluation): a bar on a terminal,
plain periodic log lines elsewhere (a log file, a batch job: step, figures, rate, ETA), and a
copy of those lines in each open run's ``run.log`` either way."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("potstill")

ENV_EVERY = "POTSTILL_PROGRESS_EVERY"
"""Seconds between two plain progress lines (default 30)."""

_sinks: list[logging.Handler] = []


def add_sink(handler: logging.Handler) -> None:
    """Copy progress lines to ``handler`` also while a bar is shown (a run's ``run.log``)."""
    _sinks.append(handler)


def remove_sink(handler: logging.Handler) -> None:
    """Stop copying progress lines to ``handler``."""
    if handler in _sinks:
        _sinks.remove(handler)


def every_s() -> float:
    """Seconds between plain progress lines: ``$POTSTILL_PROGRESS_EVERY``, else 30."""
    raw = os.environ.get(ENV_EVERY)
    try:
        return 30.0 if raw is None else max(0.0, float(raw))
    except ValueError:
        raise ValueError(f"{ENV_EVERY} must be a number of seconds, got {raw!r}") from None


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress over ``total`` units of ``desc``'s work. ``enabled`` True shows a bar, False
    nothing, None (the default) a bar on a terminal and plain log lines otherwise: at most one
    per :func:`every_s` seconds and one at the end, e.g. ``distill: step 120/600 (20%), 3.1
    step/s, ETA 2m35s, loss 0.412``. ``show`` False (a process that is not rank 0) is silent."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *,
                 enabled: bool | None = None, initial: int = 0, show: bool = True,
                 leave: bool = False) -> None:  # fmt: skip
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start_n = initial
        self.figures: dict[str, str] = {}
        self.silent = not show or enabled is False
        bar = not self.silent and (enabled is True or sys.stderr.isatty())
        self.on_terminal = bar
        self.bar = (
            tqdm(
                total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True
            )  # fmt: skip
            if bar
            else None
        )
        self.every = every_s()
        self.t0 = self._last = time.perf_counter()
        self._logged = (initial, dict(self.figures))

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        if not self.silent and time.perf_counter() - self._last >= self.every:
            self._line()

    def set_postfix(self, figures: Mapping[str, Any]) -> None:
        """Figures shown after the count (the latest losses, tokens per second …)."""
        self.figures = {k: str(v) for k, v in figures.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.figures, refresh=False)

    def line(self) -> str:
        """The plain progress line as it stands now."""
        elapsed = time.perf_counter() - self.t0
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n:,}" if self.total is None else f"{self.n:,}/{self.total:,}"
        parts = [f"{self.desc}: {self.unit} {count}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
        parts.append(f"{shown} {self.unit}/s" if rate >= 0.01 else f"{elapsed:.0f}s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {duration((self.total - self.n) / rate)}")
        elif self.total and self.n >= self.total:
            parts.append(f"done in {duration(elapsed)}")
        parts += [f"{k} {v}" for k, v in self.figures.items()]
        return ", ".join(parts)

    def _line(self) -> None:
        self._last = time.perf_counter()
        self._logged = (self.n, dict(self.figures))
        text = self.line()
        if not self.on_terminal:
            log.info("%s", text)  # the console (off a terminal) and each run.log
            return
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, "%s", (text,), None)
        for handler in list(_sinks):  # the bar is on the terminal: the line to run.log alone
            handler.handle(record)

    def close(self) -> None:
        """The end: the bar closes; a last plain line when work was done."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.silent and self.n > self._start_n and self._logged != (self.n, self.figures):
            self._line()  # unless the last line said the same
        self.silent = True  # closing twice writes nothing more

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ENV_EVERY", "Progress", "add_sink", "duration", "every_s", "remove_sink"]
