"""The subscriber store: Redis keys, the subscriber hash, the due index kept in step
with it, pending items.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from flask import current_app
from redis import WatchError

from app import status
from app.digests.periods import (
    DAILY,
    DEFAULT_HOUR,
    DEFAULT_WEEKDAY,
    OFF,
    WEEKLY,
    Schedule,
    _aware,
    _marks,
)
from app.digests.validation import (
    normalize_email,
    validate_item,
    validate_schedule,
    validate_subscriber_locale,
)
from app.errors import (
    SubscriberNotFoundError,
)
from app.queues import get_redis

SUB_PREFIX = "mq:sub:"
ITEMS_PREFIX = "mq:items:"
DUE_KEY = "mq:digest:due"


def sub_key(email: str) -> str:
    return SUB_PREFIX + email


def items_key(email: str) -> str:
    return ITEMS_PREFIX + email


def claimed_prefix(email: str) -> str:
    return f"{ITEMS_PREFIX}{email}:claimed:"


def claimed_key(email: str, period: str) -> str:
    return claimed_prefix(email) + period


def lease_key(email: str) -> str:
    return sub_key(email) + ":lease"


@dataclass
class Subscriber:
    """One subscriber as stored."""

    email: str
    schedule: Schedule
    last_period: str = ""  # the latest of either kind (display)
    dispatched: str = ""
    last_daily: str = ""
    last_weekly: str = ""
    dispatched_daily: str = ""
    dispatched_weekly: str = ""
    claimed: str = ""
    gen: str = ""
    created: str = ""
    updated: str = ""
    # The digest renders under it (email/digest.<locale>.*, Flask-Babel); "" for none.
    # Not part of the Schedule: changing it never moves a digest.
    locale: str = ""

    @classmethod
    def from_redis(cls, email: str, raw: dict[bytes, bytes]) -> Subscriber:
        data = {k.decode(): v.decode() for k, v in raw.items()}
        schedule = Schedule(
            timezone=data.get("timezone", "UTC"),
            frequency=data.get("frequency", OFF),
            hour=int(data.get("hour") or DEFAULT_HOUR),
            weekday=data.get("weekday") or DEFAULT_WEEKDAY,
        )
        return cls(
            email=email,
            schedule=schedule,
            last_period=data.get("last_period", ""),
            dispatched=data.get("dispatched", ""),
            last_daily=data.get("last_daily", ""),
            last_weekly=data.get("last_weekly", ""),
            dispatched_daily=data.get("dispatched_daily", ""),
            dispatched_weekly=data.get("dispatched_weekly", ""),
            claimed=data.get("claimed", ""),
            gen=data.get("gen", ""),
            created=data.get("created", ""),
            updated=data.get("updated", ""),
            locale=data.get("locale", ""),
        )

    def marks(self, frequency: str | None = None) -> tuple[str, str]:
        """(last handled, last dispatched) period of `frequency`'s kind (default: the
        subscriber's own); none for `off`."""
        kind = frequency or self.schedule.frequency
        if kind not in (DAILY, WEEKLY):
            return "", ""
        return _marks(kind, lambda name: str(getattr(self, name)))

    def public(self) -> dict[str, Any]:
        return {
            "email": self.email,
            **asdict(self.schedule),
            "locale": self.locale or None,
            "last_period": self.last_period or None,
            "created": self.created,
            "updated": self.updated,
        }


def upsert_subscriber(
    email: str,
    timezone: str,
    frequency: str,
    hour: int = DEFAULT_HOUR,
    weekday: str = DEFAULT_WEEKDAY,
    *,
    locale: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Create or replace a subscriber's settings; True if created.

    Raises InvalidSubscriberError naming the field; nothing is written then.
    The due time is recomputed only when the schedule changed, so saving the same
    settings again never moves or repeats a digest. `weekday` is kept for daily
    subscribers too (it applies once they switch to weekly). `locale` (a Babel
    locale, e.g. `de`) is the language of the digests; PUT replaces, so None clears it.
    """
    address = normalize_email(email)
    schedule = validate_schedule(timezone, frequency, hour, weekday)
    language = validate_subscriber_locale(locale)
    return _write_schedule(address, lambda _old: schedule, now=now, create=True, locale=language)


_NO_SCHEDULE = Schedule("UTC", OFF)


def unsubscribe(email: str, now: datetime | None = None) -> bool:
    """Set a subscriber's frequency to `off`; False if there is no such subscriber."""
    address = normalize_email(email)
    try:
        _write_schedule(address, lambda old: replace(old, frequency=OFF), now=now, create=False)
    except SubscriberNotFoundError:
        return False
    return True


def _write_schedule(
    email: str,
    change: Callable[[Schedule], Schedule],
    *,
    now: datetime | None,
    create: bool,
    locale: str | None = None,
) -> bool:
    """Apply `change(old_schedule) -> new_schedule` in an optimistic transaction
    (WATCH the subscriber's hash), keeping the due index in step; True if created.

    The index is not watched: the dispatcher moves scores all the time, and a
    score it moves meanwhile is settled by its own compare-and-set (_SETTLE_DUE).
    `locale`: written when not None (an unsubscribe leaves it as it is)."""
    redis = get_redis()
    key = sub_key(email)
    with redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                raw: Any = pipe.hgetall(key)
                old = Subscriber.from_redis(email, raw) if raw else None
                if old is None and not create:
                    raise SubscriberNotFoundError(email)
                schedule = change(old.schedule if old else _NO_SCHEDULE)
                in_index = pipe.zscore(DUE_KEY, email) is not None
                stamp = status.now_iso()
                fields = {
                    "timezone": schedule.timezone,
                    "frequency": schedule.frequency,
                    "hour": str(schedule.hour),
                    "weekday": schedule.weekday,
                    "updated": stamp,
                }
                if locale is not None:
                    fields["locale"] = locale
                if old is None:
                    fields.update(created=stamp, gen=secrets.token_hex(8))
                pipe.multi()
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                if schedule.frequency == OFF:
                    pipe.zrem(DUE_KEY, email)
                elif old is None or old.schedule != schedule or not in_index:
                    handled = old.marks(schedule.frequency) if old else ()
                    _period, due = schedule.next_send(_aware(now), *handled)
                    pipe.zadd(DUE_KEY, {email: due.timestamp()})
                pipe.execute()
                return old is None
            except WatchError:
                continue


def get_subscriber(email: str) -> Subscriber | None:
    address = normalize_email(email)
    raw: Any = get_redis().hgetall(sub_key(address))
    return Subscriber.from_redis(address, raw) if raw else None


def describe_subscriber(email: str) -> dict[str, Any]:
    """What the API shows: the settings, the pending item count, the next due time."""
    address = normalize_email(email)
    redis = get_redis()
    with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(sub_key(address))
        pipe.zscore(DUE_KEY, address)
        pipe.llen(items_key(address))
        raw, score, pending = pipe.execute()
    if not raw:
        raise SubscriberNotFoundError(address)
    subscriber = Subscriber.from_redis(address, raw)
    if subscriber.claimed:
        pending += redis.llen(claimed_key(address, subscriber.claimed))
    view = subscriber.public()
    view["pending_items"] = pending
    view["next_due"] = datetime.fromtimestamp(score, UTC).isoformat() if score is not None else None
    return view


def delete_subscriber(email: str) -> bool:
    """Forget a subscriber and everything pending for them; False if unknown."""
    address = normalize_email(email)
    keys = [sub_key(address), items_key(address), lease_key(address), DUE_KEY]
    deleted: Any = get_redis().eval(_DELETE, len(keys), *keys, address, claimed_prefix(address))
    return bool(deleted)


def add_item(
    email: str,
    title: str,
    url: str | None = None,
    body: str | None = None,
    kind: str | None = None,
) -> int | None:
    """Queue one item for the subscriber's next digest, in one Redis round trip.

    Returns the number of pending items, or None when the subscriber's frequency
    is `off` (the item is discarded: there is no next digest). Raises
    InvalidItemError / InvalidSubscriberError naming the field, or
    SubscriberNotFoundError.
    """
    address = normalize_email(email)
    item = validate_item(title, url, body, kind)
    item["at"] = status.now_iso()
    encoded = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
    cap = current_app.config["DIGEST_MAX_ITEMS"]
    reply: Any = get_redis().eval(
        _ADD_ITEM, 2, sub_key(address), items_key(address), encoded, str(cap)
    )
    if reply == -1:
        raise SubscriberNotFoundError(address)
    return None if reply == -2 else int(reply)


# KEYS: subscriber, live items. ARGV: item JSON, cap. -1: no subscriber, -2: off.
_ADD_ITEM = """
local frequency = redis.call('HGET', KEYS[1], 'frequency')
if not frequency then return -1 end
if frequency == 'off' then return -2 end
local count = redis.call('RPUSH', KEYS[2], ARGV[1])
local cap = tonumber(ARGV[2])
if count > cap then
  redis.call('LTRIM', KEYS[2], -cap, -1)
  count = cap
end
return count
"""

# KEYS: subscriber, live items, lease, due index. ARGV: email, claimed key prefix.
_DELETE = """
local claimed = redis.call('HGET', KEYS[1], 'claimed')
if claimed then redis.call('DEL', ARGV[2] .. claimed) end
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
return existed
"""
