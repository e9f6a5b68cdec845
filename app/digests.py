"""Digests: subscribers, their pending items, periods in their own time zone, the dispatcher.

Data in Redis (the web process writes, the dispatcher and digest jobs read):

- `mq:sub:<email>` hash: timezone, frequency (daily|weekly|off), hour, weekday;
  per kind of period, `last_daily`/`last_weekly` (the last one a digest job
  handled) and `dispatched_daily`/`dispatched_weekly` (the last one handed to a
  digest job), kept apart so that switching daily -> weekly -> daily never
  forgets what was sent; `last_period` and `dispatched` (the latest of either
  kind: what the API shows, and all that subscribers written before the per-kind
  fields have); `claimed` (the period whose claimed items exist), `gen` (random
  per subscriber life, part of digest mail ids), created, updated.
- `mq:digest:due` zset: email -> UTC epoch when the subscriber's next unhandled
  period is due. Only daily/weekly subscribers are in it, so finding who is due
  is one ZRANGEBYSCORE: the cost grows with those due, not with all subscribers.
- `mq:items:<email>` list of JSON items `{title, url, body, kind, at}`, oldest
  first, capped at DIGEST_MAX_ITEMS (the oldest are dropped beyond it).
- `mq:items:<email>:claimed:<period>`: the items a digest job took for that
  period, kept until the mail is accepted, so a crash or retry loses nothing.
- `mq:sub:<email>:lease`: the period whose digest job is working on the subscriber.

Periods: daily = the subscriber's local date (`2026-11-27`), weekly = local
ISO week (`2026-W48`). A period is due at local `hour:00` of its day (for
weekly, of its `weekday`); a wall time skipped by a spring-forward is due at
the first instant after the gap, an ambiguous one at its first occurrence. The
period a subscriber is due for is always the one containing "now" in their
time zone: a dispatcher that was down catches up with today's digest, never
with a backlog of older ones.

Unsubscribe tokens live here too: the mail job puts them in headers and the
web blueprint (app/unsubscribe.py) reads them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from flask import current_app, url_for
from itsdangerous import BadSignature, URLSafeSerializer
from redis import Redis, WatchError
from rq import Queue

from app import status
from app.errors import (
    InvalidItemError,
    InvalidMailError,
    InvalidSubscriberError,
    SubscriberNotFoundError,
)
from app.mail import RenderedEmail, render_email, retry_policy, validate_address
from app.queues import DIGEST_QUEUE, get_queue, get_redis, replicate

log = logging.getLogger("mailqueue.digests")

SUB_PREFIX = "mq:sub:"
ITEMS_PREFIX = "mq:items:"
DUE_KEY = "mq:digest:due"

DIGEST_TEMPLATE = "digest"
DIGEST_JOB = "jobs.digest.send_digests"
DISPATCH_JOB = "jobs.digest.dispatch"

DAILY, WEEKLY, OFF = "daily", "weekly", "off"
FREQUENCIES = (DAILY, WEEKLY, OFF)
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DEFAULT_HOUR = 8
DEFAULT_WEEKDAY = "monday"
# In the tz database listing but not IANA zone names a client should store.
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})

MAX_EMAIL_LENGTH = 254
MAX_TITLE_LENGTH = 200
MAX_URL_LENGTH = 2048
MAX_BODY_LENGTH = 2000
DEFAULT_KIND = "update"
KIND_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")

# Dispatcher: members claimed per Lua call, and how long a claimed member stays
# out of the index if the dispatcher dies before it settles the batch.
CLAIM_BATCH = 2000
CLAIM_LEASE_SECONDS = 120

UNSUBSCRIBE_SALT = "mailqueue.digest.unsubscribe"


# --- schedules and periods -------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones()) - _NOT_ZONES


@functools.lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def is_weekly_period(period: str) -> bool:
    return "-W" in period


def _same_kind(a: str, b: str) -> bool:
    return is_weekly_period(a) == is_weekly_period(b)


def _marks(kind: str, field: Callable[[str], str]) -> tuple[str, str]:
    """(last handled, last dispatched) period of `kind` (daily or weekly), from a
    subscriber's hash fields as `field(name)` reads them ("" when missing)."""
    return (
        _latest(kind, field(f"last_{kind}"), field("last_period")),
        _latest(kind, field(f"dispatched_{kind}"), field("dispatched")),
    )


def _latest(kind: str, own: str, legacy: str) -> str:
    """A kind's mark: its own field, or the one-for-both field (`last_period`,
    `dispatched`) when that holds a later period of this kind (a subscriber
    written before the per-kind fields)."""
    if legacy and (WEEKLY if is_weekly_period(legacy) else DAILY) == kind and legacy > own:
        return legacy
    return own


def is_after(period: str, other: str | None) -> bool:
    """Whether `period` comes after `other`; a period of the other kind (the
    frequency changed since) or none at all never counts as later."""
    if not other or not _same_kind(period, other):
        return True
    return period > other


def next_period(period: str) -> str:
    if is_weekly_period(period):
        year, week = period.split("-W")
        following = date.fromisocalendar(int(year), int(week), 1) + timedelta(days=7)
        iso = following.isocalendar()
        return f"{iso.year:04d}-W{iso.week:02d}"
    return (date.fromisoformat(period) + timedelta(days=1)).isoformat()


def local_instant(naive: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant of the local wall time `naive` in `zone`.

    Ambiguous (clocks went back): the first occurrence (fold=0). Nonexistent
    (clocks sprang forward over it): the first valid instant after it, i.e. the
    moment of the change.
    """
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        return first
    # In a gap, fold=0 reads `naive` with the offset before the change and fold=1
    # with the one after; the change lies between the two readings. Find the first
    # whole second whose wall time is at or past `naive`.
    other = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    low, high = int(min(first, other).timestamp()), math.ceil(max(first, other).timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        wall = datetime.fromtimestamp(middle, UTC).astimezone(zone).replace(tzinfo=None)
        if wall >= naive:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


@dataclass(frozen=True)
class Schedule:
    """When a subscriber's digests go out."""

    timezone: str
    frequency: str
    hour: int = DEFAULT_HOUR
    weekday: str = DEFAULT_WEEKDAY

    @property
    def zone(self) -> ZoneInfo:
        return _zone(self.timezone)

    def period_of(self, instant: datetime) -> str:
        """The period containing `instant` in the subscriber's time zone."""
        local = instant.astimezone(self.zone)
        if self.frequency == WEEKLY:
            iso = local.isocalendar()
            return f"{iso.year:04d}-W{iso.week:02d}"
        return local.date().isoformat()

    def due_at(self, period: str) -> datetime:
        """The UTC instant `period`'s digest becomes due."""
        if is_weekly_period(period):
            year, week = period.split("-W")
            day = date.fromisocalendar(int(year), int(week), WEEKDAYS.index(self.weekday) + 1)
        else:
            day = date.fromisoformat(period)
        return local_instant(datetime.combine(day, time(self.hour)), self.zone)

    def next_send(self, now: datetime, *handled: str | None) -> tuple[str, datetime]:
        """The first period from the one containing `now` that is not in `handled`
        (or before it), and when it is due (at or before `now`: due now)."""
        period = self.period_of(now)
        for done in handled:
            if done and not is_after(period, done):
                period = next_period(done)
        return period, self.due_at(period)


# --- validation --------------------------------------------------------------------------------


def normalize_email(value: Any) -> str:
    """A bare address (no display name), lowercased: the subscriber's identity, so
    `Ann@Example.com` and `ann@example.com` are one subscriber (no mail provider in
    practice treats the local part's case as significant)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidSubscriberError("email", "expected an email address")
    if len(value) > MAX_EMAIL_LENGTH or "<" in value or ">" in value:
        raise InvalidSubscriberError("email", f"{value[:80]!r} is not a bare email address")
    try:
        return validate_address("email", value.strip()).lower()
    except InvalidMailError as err:
        raise InvalidSubscriberError("email", str(err).partition(": ")[2]) from None


def validate_schedule(timezone: Any, frequency: Any, hour: Any, weekday: Any) -> Schedule:
    """A Schedule, or InvalidSubscriberError naming the bad field."""
    if not isinstance(timezone, str) or timezone not in _zone_names():
        raise InvalidSubscriberError(
            "timezone", f"{str(timezone)[:80]!r} is not an IANA time zone (e.g. Europe/Berlin)"
        )
    if frequency not in FREQUENCIES:
        raise InvalidSubscriberError(
            "frequency", f"{str(frequency)[:40]!r} is not one of {', '.join(FREQUENCIES)}"
        )
    if hour is None:
        hour = DEFAULT_HOUR
    if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 23:
        raise InvalidSubscriberError("hour", f"must be an integer from 0 to 23, got {hour!r}")
    if weekday is None:
        weekday = DEFAULT_WEEKDAY
    if not isinstance(weekday, str) or weekday.lower() not in WEEKDAYS:
        raise InvalidSubscriberError(
            "weekday", f"{str(weekday)[:40]!r} is not one of {', '.join(WEEKDAYS)}"
        )
    return Schedule(timezone, frequency, hour, weekday.lower())


def validate_item(
    title: Any, url: Any = None, body: Any = None, kind: Any = None
) -> dict[str, str]:
    """One digest item as stored, or InvalidItemError naming the bad field."""
    if not isinstance(title, str) or not title.strip():
        raise InvalidItemError("title", "is required (a non-empty string)")
    title = title.strip()
    if len(title) > MAX_TITLE_LENGTH:
        raise InvalidItemError("title", f"longer than {MAX_TITLE_LENGTH} characters")
    if any(ch in title for ch in "\r\n\0"):
        raise InvalidItemError("title", "must be one line (no CR, LF or NUL)")
    item = {"title": title}
    if url is not None and url != "":
        if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
            raise InvalidItemError(
                "url", f"must be a string of at most {MAX_URL_LENGTH} characters"
            )
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. "http://[abc/x": an unclosed IPv6 bracket
            raise InvalidItemError("url", "must be an absolute http or https URL") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise InvalidItemError("url", "must be an absolute http or https URL")
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
            raise InvalidItemError("url", "must not contain spaces or control characters")
        item["url"] = url
    if body is not None and body != "":
        if not isinstance(body, str) or len(body) > MAX_BODY_LENGTH:
            raise InvalidItemError(
                "body", f"must be a string of at most {MAX_BODY_LENGTH} characters"
            )
        if "\0" in body:
            raise InvalidItemError("body", "must not contain NUL")
        item["body"] = body
    if kind is None or kind == "":
        kind = DEFAULT_KIND
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise InvalidItemError(
            "kind", "must be 1-32 lowercase letters, digits, '-' or '_' (e.g. comment)"
        )
    item["kind"] = kind
    return item


# --- subscribers ---------------------------------------------------------------------------


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
    now: datetime | None = None,
) -> bool:
    """Create or replace a subscriber's settings; True if created.

    Raises InvalidSubscriberError naming the field; nothing is written then.
    The due time is recomputed only when the schedule changed, so saving the same
    settings again never moves or repeats a digest. `weekday` is kept for daily
    subscribers too (it applies once they switch to weekly).
    """
    address = normalize_email(email)
    schedule = validate_schedule(timezone, frequency, hour, weekday)
    return _write_schedule(address, lambda _old: schedule, now=now, create=True)


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
) -> bool:
    """Apply `change(old_schedule) -> new_schedule` in an optimistic transaction
    (WATCH the subscriber's hash), keeping the due index in step; True if created.

    The index is not watched: the dispatcher moves scores all the time, and a
    score it moves meanwhile is settled by its own compare-and-set (_SETTLE_DUE)."""
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


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


# --- the dispatcher ------------------------------------------------------------------------


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


# --- what a digest job does with one subscriber ------------------------------------------------


@dataclass
class Claim:
    """The outcome of claiming one subscriber's items for one period.

    outcome: go | handled | gone | off | stale | busy. With `go`, `subscriber`
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
        for email, period in pairs:
            keys = (sub_key(email), items_key(email), lease_key(email))
            pipe.eval(_CLAIM_ITEMS, len(keys), *keys, claimed_prefix(email), period, ttl)
        replies = pipe.execute()
    claims = []
    for (email, period), reply in zip(pairs, replies, strict=True):
        outcome = reply[0].decode()
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


def digest_mail_id(email: str, period: str, gen: str) -> str:
    """The same id on every attempt at one subscriber's period (a stable Message-ID, and a
    retry sees `sent`); `gen` makes a deleted and re-created subscriber's differ."""
    return hashlib.sha256(f"digest\n{email}\n{period}\n{gen}".encode()).hexdigest()[:32]


def digest_record(
    subscriber: Subscriber, period: str, count: int, unsubscribe: str | None = None
) -> status.MailRecord:
    """The mail record of one digest. Its context is a summary: the job renders from
    the claimed items, which are kept until the mail is accepted. `unsubscribe`: the
    subscriber's unsubscribe_url, when the caller has it already."""
    frequency = subscriber.schedule.frequency
    return status.MailRecord(
        id=digest_mail_id(subscriber.email, period, subscriber.gen),
        to=[subscriber.email],
        subject=digest_subject(frequency, count),
        template=DIGEST_TEMPLATE,
        context={"period": period, "frequency": frequency, "items": count},
        kind="digest",
        headers=digest_headers(subscriber.email, unsubscribe),
    )


def digest_subject(frequency: str, count: int) -> str:
    return f"Your {frequency} digest: {count} new item{'' if count == 1 else 's'}"


def digest_headers(email: str, unsubscribe: str | None = None) -> dict[str, str]:
    """RFC 8058 one-click unsubscribe and RFC 3834 auto-generated marking."""
    return {
        "List-Unsubscribe": f"<{unsubscribe or unsubscribe_url(email)}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "Auto-Submitted": "auto-generated",
    }


def digest_context(
    subscriber: Subscriber,
    period: str,
    items: list[dict[str, Any]],
    unsubscribe: str | None = None,
) -> dict[str, Any]:
    """What email/digest.{txt,html} render: items grouped by kind, newest first; the group
    with the newest item first. `unsubscribe` as for digest_record."""
    zone = subscriber.schedule.zone
    entries = []
    for index, item in enumerate(items):
        at = _parse_time(item.get("at"))
        entries.append(
            {
                "title": item["title"],
                "url": item.get("url") or "",
                "body": item.get("body") or "",
                "kind": item.get("kind") or DEFAULT_KIND,
                "at": at,
                "when": at.astimezone(zone).strftime("%a %d %b, %H:%M") if at else "",
                "order": index,
            }
        )
    entries.sort(key=lambda e: (e["at"] or datetime.min.replace(tzinfo=UTC), e["order"]))
    entries.reverse()
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(entry["kind"], []).append(entry)
    frequency = subscriber.schedule.frequency
    count = len(entries)
    return {
        "email": subscriber.email,
        "frequency": frequency,
        "period": period,
        "period_label": period_label(period),
        "timezone": subscriber.schedule.timezone,
        "hour": subscriber.schedule.hour,
        "count": count,
        "groups": [
            {
                "kind": kind,
                "label": kind.replace("_", " ").replace("-", " ").capitalize(),
                "entries": group,
            }
            for kind, group in groups.items()
        ],
        "subject": digest_subject(frequency, count),
        "unsubscribe_url": unsubscribe or unsubscribe_url(subscriber.email),
    }


def period_label(period: str) -> str:
    if is_weekly_period(period):
        year, week = period.split("-W")
        monday = date.fromisocalendar(int(year), int(week), 1)
        return f"the week of {monday.strftime('%A %d %B %Y')} (week {int(week)})"
    return date.fromisoformat(period).strftime("%A %d %B %Y")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- preview ---------------------------------------------------------------------------------


@dataclass
class Preview:
    email: str
    period: str
    due: datetime | None
    subject: str
    items: int
    rendered: RenderedEmail


def preview(email: str, now: datetime | None = None) -> Preview:
    """Render a subscriber's next digest from what is pending, claiming nothing."""
    address = normalize_email(email)
    redis = get_redis()
    raw: Any = redis.hgetall(sub_key(address))
    if not raw:
        raise SubscriberNotFoundError(address)
    subscriber = Subscriber.from_redis(address, raw)
    with redis.pipeline(transaction=False) as pipe:
        if subscriber.claimed:
            pipe.lrange(claimed_key(address, subscriber.claimed), 0, -1)
        pipe.lrange(items_key(address), 0, -1)
        lists = pipe.execute()
    items = [item for chunk in lists for item in _decode_items(chunk)]
    schedule = subscriber.schedule
    if schedule.frequency == OFF:
        period, due = replace(schedule, frequency=DAILY).period_of(_aware(now)), None
    elif subscriber.claimed and _same_kind(subscriber.claimed, schedule.period_of(_aware(now))):
        period, due = subscriber.claimed, schedule.due_at(subscriber.claimed)
    else:
        period, due_at = schedule.next_send(_aware(now), *subscriber.marks())
        due = due_at
    context = digest_context(subscriber, period, items)
    return Preview(
        email=address,
        period=period,
        due=due,
        subject=context["subject"],
        items=len(items),
        rendered=render_email(DIGEST_TEMPLATE, **context),
    )


# --- unsubscribe tokens ----------------------------------------------------------------------


def _signer() -> URLSafeSerializer:
    return URLSafeSerializer(current_app.config["SECRET_KEY"], salt=UNSUBSCRIBE_SALT)


def unsubscribe_token(email: str) -> str:
    """A token naming the subscriber, signed with SECRET_KEY (HMAC): it cannot be forged
    or edited into another subscriber's without the key."""
    return str(_signer().dumps(email))


def read_unsubscribe_token(token: str) -> str | None:
    """The subscriber a token names, or None for anything not signed by us."""
    if not isinstance(token, str) or len(token) > 1024:
        return None
    try:
        email = _signer().loads(token)
    except BadSignature:
        return None
    return email if isinstance(email, str) and email else None


def unsubscribe_url(email: str) -> str:
    """PUBLIC_URL/unsubscribe/TOKEN (needs an app context, not a request)."""
    return url_for("unsubscribe.page", token=unsubscribe_token(email), _external=True)


# --- Lua ---------------------------------------------------------------------------------------

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
