"""A recipient's mail log, and the provider events added to a mail's record.

Support's first question is "did ann@example.com get her mail?", and the API found a
mail only by its id. Each enqueue adds the mail's id to a sorted set per recipient
address (newest last, trimmed to LOG_LIMIT, so bounded however much one address is
mailed), expiring a while after the last mail's record can: the log never outlives
the records it points to by much, and ids whose records expired are skipped (and
pruned) when read.

Provider events (a webhook's bounce or complaint for one of our Message-IDs) go in a
short list per mail beside its record, with the record's remaining lifetime.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.client import Pipeline

from app import status, suppression

LOG_PREFIX = "mq:maillog:"  # zset per address: mail id -> enqueue time (microseconds)
EVENTS_PREFIX = "mq:mailevents:"  # list per mail id: JSON events, oldest first
LOG_LIMIT = 50
EVENTS_LIMIT = 20
_CHUNK = 500  # log entries per script


def log_key(address: str) -> str:
    return LOG_PREFIX + suppression.normalize(address)


def events_key(mail_id: str) -> str:
    return EVENTS_PREFIX + mail_id


def queue_log(pipe: Pipeline, records: list[status.MailRecord], config: Mapping[str, Any]) -> None:
    """Queue on `pipe` (the enqueue transaction) one log entry per recipient of each
    record, suppressed ones included (their mail is there to show why nothing went)."""
    # Long enough for the record: waiting until send_at, every retry, then its retention.
    keep = config["MAIL_STATUS_TTL"] + sum(config["MAIL_RETRY_INTERVALS"])
    keep += config["MAIL_JOB_TIMEOUT"] * (len(config["MAIL_RETRY_INTERVALS"]) + 1)
    now = time.time()
    base = int(now * 1_000_000)
    keys: list[str] = []
    values: list[Any] = []
    for index, record in enumerate(records):
        ttl = keep
        if record.send_at:
            ttl += max(0, int(datetime.fromisoformat(record.send_at).timestamp() - now))
        addresses = suppression.recipients(record) + list(record.suppressed)
        for address in dict.fromkeys(suppression.normalize(a) for a in addresses):
            keys.append(LOG_PREFIX + address)
            values += (record.id, base + index, ttl)
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        pipe.eval(
            _LOG, len(chunk), *chunk, LOG_LIMIT, *values[3 * start : 3 * start + 3 * len(chunk)]
        )


def recent(redis: Redis, address: str, limit: int = LOG_LIMIT) -> list[status.MailRecord]:
    """`address`'s latest mails, newest first (those whose records still exist)."""
    key = log_key(address)
    raw: Any = redis.zrevrange(key, 0, max(0, min(limit, LOG_LIMIT) - 1))
    ids = [item.decode() for item in raw]
    records = status.load_many(redis, ids) if ids else []
    gone = [mail_id for mail_id, record in zip(ids, records, strict=True) if record is None]
    if gone:
        redis.zrem(key, *gone)
    return [record for record in records if record is not None]


def summary(record: status.MailRecord) -> dict[str, Any]:
    """One line of the log: what support needs to answer, not the whole record."""
    view: dict[str, Any] = {
        "id": record.id,
        "status": record.status,
        "template": record.template,
        "subject": record.subject,
        "created_at": record.created_at,
    }
    if record.sent_at:
        view["sent_at"] = record.sent_at
    if record.status == status.FAILED:
        view["failed_at"] = record.updated_at
    if record.last_error:
        view["error"] = record.last_error
    return view


def add_event(redis: Redis, mail_id: str, event: str, **fields: Any) -> bool:
    """Add a provider event (`bounced`, `complained`) to mail `mail_id`; False if it has
    no record (purged, expired, or not ours)."""
    body = {"event": event, "at": datetime.now(UTC).isoformat(timespec="milliseconds")}
    body.update({name: value for name, value in fields.items() if value})
    added: Any = redis.eval(
        _ADD_EVENT, 2, status.key(mail_id), events_key(mail_id), json.dumps(body), EVENTS_LIMIT
    )
    return bool(added)


def events(redis: Redis | Pipeline, mail_id: str) -> list[dict[str, Any]]:
    raw: Any = redis.lrange(events_key(mail_id), 0, -1)
    return [json.loads(item) for item in raw]


# KEYS: log keys. ARGV: limit, then per key: mail id, score, seconds to keep the log.
_LOG = """
local limit = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local at = 3 * i - 1
  local ttl = tonumber(ARGV[at + 2])
  redis.call('ZADD', key, ARGV[at + 1], ARGV[at])
  redis.call('ZREMRANGEBYRANK', key, 0, -(limit + 1))
  if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
end
return #KEYS
"""

# KEYS: record, events. ARGV: the event's JSON, the most events kept. The list lives as
# long as the record (a week if the record has no expiry yet).
_ADD_EVENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
local ttl = redis.call('TTL', KEYS[1])
if ttl < 0 then ttl = 604800 end
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""
