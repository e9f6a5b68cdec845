"""Progress for long CLI commands (`flask digest run`, `flask mail retry --all`).

On a terminal: click's progress bar. Elsewhere (a deploy log, cron, CI): one
plain line every few seconds, so a log shows the command is alive without a
line per item. Either way the command ends with its own summary line
(`Progress.summary`), which is what scripts and people read.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

import click


class Progress:
    """Count work done out of `total` (None when unknown up front)."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        interval: float = 2.0,
        file: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.interval = interval
        self.file = file
        self.clock = clock
        self.started = clock()
        self._last_line = self.started
        self._bar: Any = None
        # A bar needs a terminal and a known total; otherwise periodic lines.
        stream: TextIO = file if file is not None else sys.stdout
        self._bar_wanted = stream.isatty() and total is not None

    def __enter__(self) -> Progress:
        if self._bar_wanted and self.total is not None:
            self._bar = click.progressbar(
                length=self.total, label=self.label, file=self.file, show_pos=True
            )
            self._bar.__enter__()
        return self

    def advance(self, count: int = 1) -> None:
        """Record `count` more items done."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = self.clock()
        if now - self._last_line >= self.interval:
            self._last_line = now
            click.echo(f"{self.label}: {self._position()}", file=self.file)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def summary(self, text: str) -> None:
        """The closing line: `text` and how long it took."""
        click.echo(f"{text} in {self.elapsed:.1f} s", file=self.file)

    def _position(self) -> str:
        if self.total is None:
            return f"{self.done} done"
        # The total may be an estimate (work arriving meanwhile): never past 100%.
        percent = min(100, 100 * self.done // self.total) if self.total else 100
        return f"{self.done}/{self.total} ({percent}%)"
