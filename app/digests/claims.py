"""What a digest job does with one subscriber's period: claim the pending items under
a lease, then settle (mark handled, drop or give back the items) or release.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from redis import Redis

from app import status, suppression
from app.digests.message import DIGEST_TEMPLATE
from app.digests.subscribers import (
    Subscriber,
    claimed_key,
    claimed_prefix,
    items_key,
    lease_key,
    sub_key,
)
from app.queues import replicate

log = logging.getLogger("mailqueue.digests")


@dataclass
class Claim:
    """The outcome of claiming one subscriber's items for one period.

    outcome: go | handled | gone | off | stale | busy | suppressed. With `go`, `subscriber`
    and `items` (oldest first) are set; `items` may be empty.
    """

    email: str
    period: str
    outcome: str
    subscriber: Subscriber | None = None
    items: list[dict[str, Any]] = field(default_factory=list)


def claim_many(redis: Redis, pairs: list[tuple[str, str]]) -> list[Claim]:
    """Claim the pending items of every (email, period) in one pipelined round trip.

    For each: skip a handled, deleted, `off` or superseded period; take the
    subscriber's lease for this period (a job of another period waits); reuse the
    claimed list of an earlier attempt at this period; else move the live list to
    the claimed list (RENAME: items that arrive later start a new live list and go
    into the next digest). Claimed items of an earlier period whose job never
    finished go first into this one.
    """
    ttl = str(current_app.config["DIGEST_JOB_TIMEOUT"] + 60)
    with redis.pipeline(transaction=False) as pipe:
        # In the same round trip: which of them are suppressed (outcome `suppressed`:
        # claimed, for jobs/digest.py to put back without sending).
        if pairs:
            suppression.queue_check(pipe, [email for email, _period in pairs])
        for email, period in pairs:
            keys = (sub_key(email), items_key(email), lease_key(email))
            pipe.eval(_CLAIM_ITEMS, len(keys), *keys, claimed_prefix(email), period, ttl)
        held, *replies = pipe.execute() if pairs else [[]]
    claims = []
    for (email, period), reply, entry in zip(pairs, replies, held, strict=True):
        outcome = reply[0].decode()
        if outcome == "go" and entry:
            outcome = "suppressed"
        claim = Claim(email, period, outcome)
        if outcome == "go":
            raw = reply[1]
            claim.subscriber = Subscriber.from_redis(
                email, dict(zip(raw[::2], raw[1::2], strict=True))
            )
            claim.items = list(_decode_items(reply[2]))
        claims.append(claim)
    return claims


def _decode_items(raw_items: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    for raw in raw_items:
        try:
            item = json.loads(raw)
        except ValueError:
            log.error("dropping an unreadable digest item: %r", raw[:100])
            continue
        if isinstance(item, dict) and isinstance(item.get("title"), str):
            yield item


def settle(
    redis: Redis,
    email: str,
    period: str,
    *,
    mode: str,
    mail_id: str | None = None,
    mail_status: str | None = None,
    then_begin: tuple[status.MailRecord, int] | None = None,
    **record_fields: Any,
) -> Any:
    """End one subscriber's period in one MULTI/EXEC: mark it handled, drop the claimed
    items (`sent`/`empty`) or put them back in front of the live list (`giveup`),
    release the lease, and finish the mail record if there is one.

    `then_begin` (the next digest's record and lease seconds): claim that digest's
    delivery attempt in the same round trip (status.begin_attempt, creating its
    record); its reply is returned for status.attempt_from_reply.
    """
    config = current_app.config
    keys = (sub_key(email), lease_key(email), claimed_key(email, period), items_key(email))
    with redis.pipeline(transaction=True) as pipe:
        pipe.multi()
        if mode == "sent":
            replicate(pipe)  # the period marked handled survives a failover
        pipe.eval(_SETTLE_SUBSCRIBER, len(keys), *keys, period, mode, config["DIGEST_MAX_ITEMS"])
        if mail_id and mail_status:
            ttl = (
                config["DIGEST_STATUS_TTL"]
                if mail_status == status.SENT
                else config["MAIL_STATUS_TTL"]
            )
            status.queue_finish(
                pipe, mail_id, mail_status, ttl, metric_template=DIGEST_TEMPLATE, **record_fields
            )
        if then_begin is not None:
            record, lease_seconds = then_begin
            status.queue_begin_attempt(
                pipe,
                record.id,
                lease_seconds,
                create=record,
                create_ttl=config["MAIL_STATUS_TTL"],
            )
        replies = pipe.execute()
    return replies[-1] if then_begin is not None else None


def release(redis: Redis, email: str, period: str) -> None:
    """Let a later attempt at this period (or another period's job) take the subscriber;
    the claimed items stay for the retry."""
    redis.eval(_RELEASE, 1, lease_key(email), period)


# KEYS: subscriber, live items, lease. ARGV: claimed key prefix, period, lease seconds.
_CLAIM_ITEMS = """
local period = ARGV[2]
local weekly = string.find(period, '-W', 1, true) ~= nil
local function same_kind(other)
  return other and (string.find(other, '-W', 1, true) ~= nil) == weekly
end
local f = redis.call('HMGET', KEYS[1], 'frequency', 'last_period', 'claimed',
  weekly and 'last_weekly' or 'last_daily')
if not f[1] then return {'gone'} end
if f[1] == 'off' then return {'off'} end
if (f[1] == 'weekly') ~= weekly then return {'stale'} end
if f[4] and f[4] >= period then return {'handled'} end
if same_kind(f[2]) and f[2] >= period then return {'handled'} end
if same_kind(f[3]) and f[3] > period then return {'stale'} end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= period then return {'busy'} end
redis.call('SET', KEYS[3], period, 'EX', tonumber(ARGV[3]))
local target = ARGV[1] .. period
if f[3] ~= period then
  local orphan = f[3] and (ARGV[1] .. f[3])
  if orphan and redis.call('EXISTS', orphan) == 1 then
    for _, item in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
      redis.call('RPUSH', orphan, item)
    end
    redis.call('DEL', KEYS[2])
    redis.call('RENAME', orphan, target)
  elseif redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('RENAME', KEYS[2], target)
  end
  redis.call('HSET', KEYS[1], 'claimed', period)
end
return {'go', redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', target, 0, -1)}
"""

# KEYS: subscriber, lease, claimed items, live items. ARGV: period, mode (sent | empty |
# giveup), item cap. Never re-creates a deleted subscriber.
_SETTLE_SUBSCRIBER = """
local period = ARGV[1]
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[2] == 'giveup' and exists then
  local items = redis.call('LRANGE', KEYS[3], 0, -1)
  for i = #items, 1, -1 do redis.call('LPUSH', KEYS[4], items[i]) end
  if #items > 0 then redis.call('LTRIM', KEYS[4], -tonumber(ARGV[3]), -1) end
end
redis.call('DEL', KEYS[3])
if exists then
  local last = redis.call('HGET', KEYS[1], 'last_period')
  local weekly = string.find(period, '-W', 1, true) ~= nil
  if not last or (string.find(last, '-W', 1, true) ~= nil) ~= weekly or last < period then
    redis.call('HSET', KEYS[1], 'last_period', period)
  end
  local field = weekly and 'last_weekly' or 'last_daily'
  local mark = redis.call('HGET', KEYS[1], field)
  if not mark or mark < period then redis.call('HSET', KEYS[1], field, period) end
  if redis.call('HGET', KEYS[1], 'claimed') == period then
    redis.call('HDEL', KEYS[1], 'claimed')
  end
end
if redis.call('GET', KEYS[2]) == period then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: lease. ARGV: period.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
