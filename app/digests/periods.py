"""Schedules and periods in the subscriber's own time zone: the period containing an
instant, when a period is due (DST gaps and folds included), the next one to send.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, available_timezones

DAILY, WEEKLY, OFF = "daily", "weekly", "off"
FREQUENCIES = (DAILY, WEEKLY, OFF)
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DEFAULT_HOUR = 8
DEFAULT_WEEKDAY = "monday"
# In the tz database listing but not IANA zone names a client should store.
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})


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


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)
