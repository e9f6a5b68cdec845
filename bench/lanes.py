"""The lanes row: `python -m bench --rows lanes` (issue 16).

With 2 Procfile workers and LANES_BACKLOG `bulk` mails queued (send_many), five `high`
mails are sent one at a time, each once the previous arrived, and one `normal` mail
after them; each one's latency (send_email to the sink's acceptance) is reported,
on loopback and with the sink holding every reply LANES_LAG_MS back. The bulk
mails' throughput is measured in the same run with the urgent mails and in a run
without them. Targets: a high mail within 1 s on loopback, within 1 s plus two
round trips at 50 ms; bulk throughput not lower with the urgent mails.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.run import Bench

LANES_BACKLOG = 20_000
LANES_LAG_MS = 50.0
URGENT = ("high", "high", "high", "high", "high", "normal")
WAIT_SECONDS = 30.0  # an urgent mail not seen by then is reported as missing


@dataclass
class LanesResult:
    lag_ms: float
    backlog: int
    latencies_ms: list[tuple[str, float]] = field(default_factory=list)  # (lane, ms)
    bulk_rate: float = math.nan  # mails/s with the urgent mails sent meanwhile
    bulk_rate_alone: float = math.nan  # the same backlog, no urgent mail
    bulk_left: int = 0  # bulk mails still queued when the last urgent one arrived
    duplicates: int = 0
    missing: int = 0


def measure(bench: Bench, lag_ms: float, backlog: int = LANES_BACKLOG) -> LanesResult:
    """Both runs (with, then without the urgent mails) at `lag_ms`."""
    result = LanesResult(lag_ms, backlog)
    bench.sink.set_lag(lag_ms)
    try:
        result.bulk_rate = _run(bench, backlog, result)
        result.bulk_rate_alone = _run(bench, backlog, None)
    finally:
        bench.sink.set_lag(0)
    return result


def _run(bench: Bench, backlog: int, urgent: LanesResult | None) -> float:
    """One backlog drained by 2 workers; returns its mails/s (first enqueue to last
    acceptance). With `urgent`, sends URGENT meanwhile and records their latencies."""
    from redis import Redis

    from app.mail import send_email, send_many
    from bench import workload
    from bench.run import _mq_message_id, _send_email

    workers = bench.start_workers(2, "lanes")
    redis = Redis.from_url(bench.redis.url)
    try:
        with bench.app.app_context():
            bench.warm_up(lambda i: _send_email(send_email, i), *workers)
            bench.sink.reset()
            started = time.monotonic()
            ids = send_many(
                [
                    {"to": to, "subject": subject, "template": workload.TEMPLATE, "context": ctx}
                    for to, subject, ctx in (workload.mail(i) for i in range(backlog))
                ],
                priority="bulk",
            )
            if urgent is not None:
                bench.sink.wait_for(min(backlog, 500), timeout=120)  # the backlog is flowing
                for k, lane in enumerate(URGENT):
                    to, subject, ctx = workload.mail(5_000_000 + k)
                    sent = time.monotonic()
                    job = send_email(to, subject, workload.TEMPLATE, priority=lane, **ctx)
                    entry = _wait_seen(bench, _mq_message_id(job.id))
                    if entry is None:
                        urgent.missing += 1
                    else:
                        urgent.latencies_ms.append((lane, (entry[0] - sent) * 1000))
                urgent.bulk_left = int(redis.llen("rq:queue:mail-bulk"))
            expected = backlog + (len(URGENT) if urgent is not None else 0)
            bench.sink.wait_for(expected, timeout=max(600, backlog / 20), stall=60)
        received = bench.sink.dump()
        accepted = [received[m][0] for m in map(_mq_message_id, ids) if m in received]
        if urgent is not None:
            urgent.duplicates = sum(int(t) - 1 for _at, t in received.values())
            urgent.missing += backlog - len(accepted)
        return len(accepted) / (max(accepted) - started) if accepted else math.nan
    finally:
        for worker in workers:
            bench.stop(worker)
        bench.flush()


def _wait_seen(bench: Bench, message_id: str) -> list[float] | None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        entry = bench.sink.seen(message_id)
        if entry is not None:
            return entry
        time.sleep(0.002)
    return None


def render(results: list[LanesResult]) -> list[str]:
    """The lanes table: each urgent mail's latency, bulk throughput with and without."""
    if not results:
        return []
    lines = [
        "",
        f"Lanes (issue 16): 2 workers, {results[0].backlog:,} bulk mails queued; urgent mails "
        "sent one at a time (target: high within 1 s, + two round trips at a lag):",
        "",
        "| lag ms | high mails, each ms | normal ms | bulk mails/s with urgent | "
        "bulk mails/s alone | x | bulk left | missing | duplicates |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        high = ", ".join(f"{ms:.0f}" for lane, ms in r.latencies_ms if lane == "high")
        normal = ", ".join(f"{ms:.0f}" for lane, ms in r.latencies_ms if lane == "normal")
        lines.append(
            f"| {r.lag_ms:g} | {high} | {normal} | {r.bulk_rate:,.0f} | "
            f"{r.bulk_rate_alone:,.0f} | {r.bulk_rate / r.bulk_rate_alone:.2f} | "
            f"{r.bulk_left:,} | {r.missing} | {r.duplicates} |"
        )
    return lines
