"""The lag table: `python -m bench --lag-ms 0,20,50,100`.

Production is not loopback: a provider's SMTP replies take tens of milliseconds,
and there a sender that holds one mail at a time is bound by round trips, not
CPU. For each lag the sink (bench/sink.py) holds every reply back that long,
greeting included, still offering PIPELINING as providers do, and these rows run
in the same run, each also as a ratio to its own rate at lag 0:

  (c)   2 Procfile workers, default settings (MAIL_CONCURRENCY 16);
  (cb)  the same, the sink also offering CHUNKING (RFC 3030, as Postfix, Gmail and
        Microsoft 365 do): the body goes with the envelope as BDAT, one round trip
        a mail instead of two (the classic recipe's smtplib never uses it);
  (c64) 2 Procfile workers, MAIL_CONCURRENCY=64;
  (c1)  2 Procfile workers, MAIL_CONCURRENCY=1 (one mail at a time, as before);
  (a)   the classic recipe: a thread per mail, a connection per mail;
  (bt)  Celery 5, one worker, -P threads -c 32;
  (b)   Celery 5, prefork -c 2 (it holds two mails in flight: it gets a tenth of
        the mails, or it would take minutes);
  (d64) digests, 2 workers, MAIL_CONCURRENCY=64.

Connections are the SMTP connections the sink saw opened while a row ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.run import Bench, Row

CONCURRENCY_64 = {"MAIL_CONCURRENCY": "64"}

# (key, label for the table, rows-to-make); "q" marks a queue row (ratio to its loopback).
KINDS = ("c", "cb", "c64", "c1", "a", "bt", "b", "d64")
CHUNKING_ROWS = {"cb"}


def plan(
    bench: Bench, lags: list[float], n: int, subscribers: int, kinds: list[str]
) -> list[tuple[str, float, Callable[[], Row]]]:
    """(key, lag, make) for every lag row, the lags in the order given (0 first)."""
    steps: list[tuple[str, float, Callable[[], Row]]] = []
    for lag in lags:
        makers: dict[str, Callable[[], Row]] = {
            "c": lambda: bench.row_mailqueue(2, key="c", n=n),
            "cb": lambda: bench.row_mailqueue(2, key="cb", n=n),
            "c64": lambda: bench.row_mailqueue(2, CONCURRENCY_64, key="c64", n=n),
            "c1": lambda: bench.row_mailqueue(2, {"MAIL_CONCURRENCY": "1"}, key="c1", n=n),
            "a": lambda: bench.row_driver("a", "classic recipe: thread per mail", "classic", 1, n),
            "bt": lambda: bench.row_celery("threads", 32, key="bt", n=n),
            "b": lambda: bench.row_celery("prefork", 2, key="b", n=max(20, n // 10)),
            "d64": lambda: bench.row_digest(CONCURRENCY_64, key="d64", subscribers=subscribers),
        }
        for key in kinds:
            steps.append((key, lag, _at_lag(bench, lag, makers[key], key in CHUNKING_ROWS)))
    return steps


def _at_lag(
    bench: Bench, lag: float, make: Callable[[], Row], chunking: bool = False
) -> Callable[[], Row]:
    def run() -> Row:
        bench.sink.set_lag(lag)
        bench.sink.set_chunking(chunking)
        try:
            row = make()
        finally:
            bench.sink.set_lag(0)
            bench.sink.set_chunking(False)
        row.lag_ms = lag
        if chunking:
            row.label += ", server offers CHUNKING"
        return row

    return run


def render(rows: list[Row]) -> list[str]:
    """The lag table, with each row's ratio to the same row at lag 0 and the targets'
    ratios (issue 13) at every lag."""
    if not rows:
        return []
    loopback = {r.key: r.rate for r in rows if r.lag_ms == 0 and r.complete}
    lines = [
        "",
        "SMTP replies delayed by a lag (a provider a round trip away):",
        "",
        "| lag ms | row | mails | mails/s | x own loopback | connections | peak RSS MB/proc "
        "| p50 ms |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        got = f"{r.received}" if r.complete else f"{r.received}/{r.sent}"
        base = loopback.get(r.key, math.nan)
        lines.append(
            f"| {r.lag_ms:g} | ({r.key}) {r.label} | {got} | {_f(r.rate, 0)} | "
            f"{_f(r.rate / base, 2)} | {r.connections} | {_f(r.rss_mb, 0)} | {_f(r.p50_ms, 0)} |"
        )
    lines += ["", "Ratios the targets name (issue 13), at each lag:", ""]
    lines += [
        "| lag ms | (c) / (a) | (cb) / (a) | (c) / (bt) | (c64) / own loopback "
        "| (d64) / own loopback |"
    ]
    lines += ["| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lag in sorted({r.lag_ms for r in rows}):
        at = {r.key: r.rate for r in rows if r.lag_ms == lag and r.complete}
        lines.append(
            f"| {lag:g} | {_f(_ratio(at, 'c', 'a'), 2)} | {_f(_ratio(at, 'cb', 'a'), 2)} | "
            f"{_f(_ratio(at, 'c', 'bt'), 2)} | "
            f"{_f(at.get('c64', math.nan) / loopback.get('c64', math.nan), 2)} | "
            f"{_f(at.get('d64', math.nan) / loopback.get('d64', math.nan), 2)} |"
        )
    return lines


def _ratio(rates: dict[str, float], top: str, bottom: str) -> float:
    return rates.get(top, math.nan) / rates.get(bottom, math.nan)


def _f(value: float, digits: int) -> str:
    return "" if math.isnan(value) else f"{value:,.{digits}f}"
