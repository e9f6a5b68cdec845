"""Helpers for digest tests: a dispatcher driven by a moving clock, bulk subscribers."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import time_machine
from redis import Redis

from app import digests
from app.queues import DIGEST_QUEUE, get_queue


@dataclass(frozen=True)
class Dispatched:
    """One [email, period] a dispatch run handed to a digest job, and when."""

    at: datetime
    email: str
    period: str


def utc(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def queued_pairs(keep: bool = False) -> list[tuple[str, str]]:
    """Every [email, period] in the digests queue's jobs; the queue is emptied unless `keep`."""
    queue = get_queue(DIGEST_QUEUE)
    pairs = [
        (str(email), str(period))
        for job in queue.get_jobs()
        if job.func_name == digests.DIGEST_JOB
        for email, period in job.args[0]
    ]
    if not keep:
        queue.empty()
    return pairs


def run_dispatcher(
    traveller: time_machine.Coordinates,
    start: datetime,
    end: datetime,
    step: timedelta = timedelta(minutes=5),
    *,
    deliver: bool = False,
    every_step: Callable[[datetime], None] | None = None,
) -> list[Dispatched]:
    """Move the clock from `start` to `end`, dispatching every `step` as the cron would;
    return what was dispatched. The jobs are dropped, not run, unless `deliver` is
    set: then each is run at once, as a worker would. `every_step(moment)` runs
    before each dispatch (to add items, say)."""
    out: list[Dispatched] = []
    moment = start
    while moment <= end:
        traveller.move_to(moment)
        if every_step is not None:
            every_step(moment)
        if digests.dispatch_due().enqueued:
            pairs = queued_pairs()
            out.extend(Dispatched(moment, e, p) for e, p in pairs)
            if deliver:
                from jobs.digest import send_digests

                send_digests([list(pair) for pair in pairs])
        moment += step
    return out


def bulk_subscribers(
    redis: Redis, emails: list[str], zones: list[str], due: float, hour: int = 8
) -> None:
    """Write subscribers straight into Redis (as upsert would), all due at `due`."""
    stamp = datetime.now(UTC).isoformat()
    with redis.pipeline(transaction=False) as pipe:
        for index, email in enumerate(emails):
            mapping: Any = {
                "timezone": zones[index % len(zones)],
                "frequency": "daily",
                "hour": str(hour),
                "weekday": "monday",
                "gen": secrets.token_hex(8),
                "created": stamp,
                "updated": stamp,
            }
            pipe.hset(digests.sub_key(email), mapping=mapping)
            pipe.zadd(digests.DUE_KEY, {email: due})
            if index % 5000 == 4999:
                pipe.execute()
        pipe.execute()
