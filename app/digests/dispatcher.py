"""The dispatcher: claims due subscribers from the index in batches and enqueues their
digest jobs, moving each entry to its next due time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfoNotFoundError

from flask import current_app
from rq import Queue

from app.digests.periods import DAILY, WEEKLY, Schedule, _aware, _marks, next_period
from app.digests.subscribers import DUE_KEY, SUB_PREFIX
from app.mail import retry_policy
from app.queues import DIGEST_QUEUE, get_queue, get_redis

log = logging.getLogger("mailqueue.digests")


DIGEST_JOB = "jobs.digest.send_digests"
DISPATCH_JOB = "jobs.digest.dispatch"


# Dispatcher: members claimed per Lua call, and how long a claimed member stays
# out of the index if the dispatcher dies before it settles the batch.
CLAIM_BATCH = 2000
CLAIM_LEASE_SECONDS = 120


@dataclass
class DispatchResult:
    """due: subscribers whose index entry had come due; enqueued: digests handed to
    jobs; skipped: due entries that needed no digest (off, gone, already handled, or
    their current period not due yet: rescheduled); jobs: digest jobs enqueued."""

    due: int = 0
    enqueued: int = 0
    skipped: int = 0
    jobs: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_SUB_FIELDS = (
    "timezone",
    "frequency",
    "hour",
    "weekday",
    "last_period",
    "dispatched",
    "last_daily",
    "last_weekly",
    "dispatched_daily",
    "dispatched_weekly",
)


def count_due(now: datetime | None = None) -> int:
    """How many subscribers' index entries are due at `now` (one ZCOUNT; an estimate
    for progress: a concurrent dispatcher may take some of them)."""
    count: Any = get_redis().zcount(DUE_KEY, "-inf", _aware(now).timestamp())
    return int(count)


def dispatch_due(
    now: datetime | None = None,
    *,
    batch: int = CLAIM_BATCH,
    on_batch: Callable[[int], None] | None = None,
) -> DispatchResult:
    """Enqueue a digest for every subscriber whose current period is due and unhandled.

    Per batch of up to `batch` due subscribers: one Lua call claims them (moves
    their index entry to a short lease, so a concurrent dispatcher never takes the
    same ones) and returns their settings, then one MULTI/EXEC that
    enqueues the digest jobs (DIGEST_CHUNK_SIZE subscribers each) and moves each
    entry to its next period's due time. A dispatcher that dies mid-batch leaves
    leased entries that come due again after CLAIM_LEASE_SECONDS. `on_batch(n)` hears
    of every batch of `n` due subscribers done (progress for `flask digest run`).
    """
    now = _aware(now)
    redis = get_redis()
    queue = get_queue(DIGEST_QUEUE)
    config = current_app.config
    chunk = config["DIGEST_CHUNK_SIZE"]
    result = DispatchResult()
    cache: dict[tuple[Schedule, str, str], tuple[str | None, float]] = {}
    while True:
        lease = math.floor(now.timestamp()) + CLAIM_LEASE_SECONDS
        # One round trip: the claimed members, each followed by its settings (flat).
        reply: Any = redis.eval(
            _CLAIM_DUE, 1, DUE_KEY, repr(now.timestamp()), lease, batch, SUB_PREFIX
        )
        if not reply:
            break
        width = 1 + len(_SUB_FIELDS)
        rows = [reply[start : start + width] for start in range(0, len(reply), width)]
        result.due += len(rows)
        pairs: list[list[str]] = []
        settle: list[str] = []
        for row in rows:
            email = row[0].decode()
            period, next_due = _evaluate(email, row[1:], now, cache)
            if period:
                pairs.append([email, period])
            else:
                result.skipped += 1
            settle.extend((email, period or "", _score(next_due)))
        with redis.pipeline(transaction=True) as pipe:
            pipe.multi()
            if pairs:
                parts = [pairs[start : start + chunk] for start in range(0, len(pairs), chunk)]
                job_datas = [
                    Queue.prepare_data(
                        DIGEST_JOB,
                        args=(part,),
                        timeout=config["DIGEST_JOB_TIMEOUT"],
                        result_ttl=0,
                        failure_ttl=config["MAIL_STATUS_TTL"],
                        retry=retry_policy(config["MAIL_RETRY_INTERVALS"]),
                        description=f"digests x{len(part)}",
                    )
                    for part in parts
                ]
                queue.enqueue_many(job_datas, pipeline=pipe)
                result.jobs += len(job_datas)
            pipe.eval(_SETTLE_DUE, 1, DUE_KEY, lease, SUB_PREFIX, *settle)
            pipe.execute()
        result.enqueued += len(pairs)
        if on_batch is not None:
            on_batch(len(rows))
        if len(rows) < batch:
            break
    return result


def _evaluate(
    email: str,
    row: list[bytes | None],
    now: datetime,
    cache: dict[tuple[Schedule, str, str], tuple[str | None, float]],
) -> tuple[str | None, float | None]:
    """(period to send now or None, next due epoch or None to leave the index)."""
    fields = dict(zip(_SUB_FIELDS, (v.decode() if v is not None else "" for v in row), strict=True))
    timezone, frequency, hour, weekday = (fields[name] for name in _SUB_FIELDS[:4])
    if frequency not in (DAILY, WEEKLY):
        return None, None  # deleted or off since it was indexed
    last, dispatched = _marks(frequency, fields.__getitem__)
    try:
        schedule = Schedule(timezone, frequency, int(hour), weekday)
        key = (schedule, last, dispatched)
        if key not in cache:
            period, due = schedule.next_send(now, last, dispatched)
            if due <= now:
                cache[key] = (period, schedule.due_at(next_period(period)).timestamp())
            else:
                cache[key] = (None, due.timestamp())
        return cache[key]
    except (ValueError, KeyError, ZoneInfoNotFoundError):
        log.error("subscriber %s has unreadable settings; dropped from the digest index", email)
        return None, None


def _score(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return str(int(epoch)) if float(epoch).is_integer() else repr(epoch)


# KEYS: due index. ARGV: now (epoch), lease score, batch size, subscriber key prefix.
# Returns a flat list: each member followed by its _SUB_FIELDS (false when missing).
_CLAIM_DUE = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, member in ipairs(members) do
  redis.call('ZADD', KEYS[1], ARGV[2], member)
  local fields = redis.call('HMGET', ARGV[4] .. member,
    'timezone', 'frequency', 'hour', 'weekday', 'last_period', 'dispatched',
    'last_daily', 'last_weekly', 'dispatched_daily', 'dispatched_weekly')
  out[#out + 1] = member
  for i = 1, 10 do out[#out + 1] = fields[i] end
end
return out
"""

# KEYS: due index. ARGV: lease score, subscriber key prefix, then (email, period or '',
# next due or '') triples. An entry still at our lease moves to its next due time (or
# leaves the index); one that an upsert moved meanwhile keeps the upsert's.
_SETTLE_DUE = """
local lease = tonumber(ARGV[1])
for i = 3, #ARGV, 3 do
  local email, period, score = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local current = redis.call('ZSCORE', KEYS[1], email)
  if current and tonumber(current) == lease then
    if score == '' then
      redis.call('ZREM', KEYS[1], email)
    else
      redis.call('ZADD', KEYS[1], score, email)
    end
  end
  local sub = ARGV[2] .. email
  if period ~= '' and redis.call('EXISTS', sub) == 1 then
    local before = redis.call('HGET', sub, 'dispatched')
    local weekly = string.find(period, '-W', 1, true) ~= nil
    if not before or (string.find(before, '-W', 1, true) ~= nil) ~= weekly or before < period then
      redis.call('HSET', sub, 'dispatched', period)
    end
    local field = weekly and 'dispatched_weekly' or 'dispatched_daily'
    local mark = redis.call('HGET', sub, field)
    if not mark or mark < period then redis.call('HSET', sub, field, period) end
  end
end
return 1
"""
