"""Progress lines for long CLI commands: periodic in logs, a bar on a terminal."""

from __future__ import annotations

import io

from app.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_interval_and_a_summary() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress("retrying", 10, interval=2.0, file=out, clock=clock) as progress:
        for _ in range(10):
            clock.now += 0.5
            progress.advance()
    progress.summary("retried 10 mails")
    assert out.getvalue().splitlines() == [
        "retrying: 4/10 (40%)",
        "retrying: 8/10 (80%)",
        "retried 10 mails in 5.0 s",
    ]


def test_unknown_total_counts_only() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress("dispatching", None, interval=1.0, file=out, clock=clock) as progress:
        clock.now += 1
        progress.advance(3)
    assert out.getvalue() == "dispatching: 3 done\n"


def test_empty_total_is_not_a_division_by_zero() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress("x", 0, interval=0.0, file=out, clock=clock) as progress:
        progress.advance(0)
    assert out.getvalue() == "x: 0/0 (100%)\n"


def test_a_terminal_gets_a_bar() -> None:
    out = Terminal()
    with Progress("retrying", 3, file=out) as progress:
        for _ in range(3):
            progress.advance()
    assert "retrying" in out.getvalue() and "3/3" in out.getvalue()
