"""Periods and send times in the subscriber's zone, DST included (pure functions, no Redis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from app.digests import (
    Schedule,
    is_after,
    local_instant,
    next_period,
    validate_item,
    validate_schedule,
)
from app.errors import InvalidItemError, InvalidSubscriberError


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("zone", "wall", "expected_utc"),
    [
        # Ordinary times.
        ("Europe/Berlin", "2026-11-27T08:00", "2026-11-27T07:00"),
        ("Asia/Kolkata", "2026-11-27T08:00", "2026-11-27T02:30"),
        # Spring forward: Berlin 02:00 CET -> 03:00 CEST at 01:00 UTC (last Sunday of March).
        ("Europe/Berlin", "2026-03-29T02:00", "2026-03-29T01:00"),
        ("Europe/Berlin", "2026-03-29T02:30", "2026-03-29T01:00"),
        ("Europe/Berlin", "2026-03-29T01:00", "2026-03-29T00:00"),
        ("Europe/Berlin", "2026-03-29T03:00", "2026-03-29T01:00"),
        # Fall back: Berlin 03:00 CEST -> 02:00 CET at 01:00 UTC: 02:xx twice, the first wins.
        ("Europe/Berlin", "2026-10-25T02:00", "2026-10-25T00:00"),
        ("Europe/Berlin", "2026-10-25T02:30", "2026-10-25T00:30"),
        # New York: spring forward 2026-03-08 at 07:00 UTC, fall back 2026-11-01 at 06:00 UTC.
        ("America/New_York", "2026-03-08T02:00", "2026-03-08T07:00"),
        ("America/New_York", "2026-03-08T02:30", "2026-03-08T07:00"),
        ("America/New_York", "2026-11-01T01:00", "2026-11-01T05:00"),
        ("America/New_York", "2026-11-01T01:30", "2026-11-01T05:30"),
        # Lord Howe Island springs forward by 30 minutes (02:00 -> 02:30 local).
        ("Australia/Lord_Howe", "2026-10-04T02:00", "2026-10-03T15:30"),
    ],
)
def test_local_instant(zone: str, wall: str, expected_utc: str) -> None:
    assert local_instant(datetime.fromisoformat(wall), ZoneInfo(zone)) == utc(expected_utc)


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
def test_every_hour_of_a_year_maps_to_one_instant_in_order(zone: str) -> None:
    """Send times never go backwards and never collapse two different days into one."""
    schedule_by_hour = [Schedule(zone, "daily", hour) for hour in range(24)]
    day = datetime(2026, 1, 1)
    previous = {hour: datetime.min.replace(tzinfo=UTC) for hour in range(24)}
    for _ in range(366):
        period = day.date().isoformat()
        for hour, schedule in enumerate(schedule_by_hour):
            due = schedule.due_at(period)
            assert due > previous[hour] + timedelta(hours=22)
            assert schedule.period_of(due) == period  # due inside its own local day
            previous[hour] = due
        day += timedelta(days=1)


def test_periods_daily_and_weekly() -> None:
    daily = Schedule("Pacific/Auckland", "daily", 8)
    weekly = Schedule("Pacific/Auckland", "weekly", 8, "sunday")
    instant = utc("2026-11-27T20:00")  # Saturday 28 Nov 09:00 in Auckland (+13)
    assert daily.period_of(instant) == "2026-11-28"
    assert weekly.period_of(instant) == "2026-W48"
    assert weekly.due_at("2026-W48") == utc("2026-11-28T19:00")  # Sunday 29 Nov 08:00 local
    assert next_period("2026-12-31") == "2027-01-01"
    assert next_period("2026-W53") == "2027-W01"
    assert next_period("2027-W52") == "2028-W01"  # 2027 has 52 ISO weeks
    assert is_after("2026-11-28", "2026-11-27")
    assert not is_after("2026-11-27", "2026-11-27")
    assert is_after("2026-11-27", "2026-W48")  # other kind: the frequency changed
    assert is_after("2026-11-27", "")


def test_next_send_skips_handled_periods() -> None:
    schedule = Schedule("UTC", "daily", 8)
    now = utc("2026-11-27T09:00")
    assert schedule.next_send(now) == ("2026-11-27", utc("2026-11-27T08:00"))
    assert schedule.next_send(now, "2026-11-27") == ("2026-11-28", utc("2026-11-28T08:00"))
    assert schedule.next_send(now, "2026-11-26", "") == ("2026-11-27", utc("2026-11-27T08:00"))
    assert schedule.next_send(now, "2026-W48") == ("2026-11-27", utc("2026-11-27T08:00"))


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("Mars/Olympus", "daily", 8, "monday"), "timezone"),
        (("localtime", "daily", 8, "monday"), "timezone"),
        (("../../etc/passwd", "daily", 8, "monday"), "timezone"),
        ((None, "daily", 8, "monday"), "timezone"),
        (("UTC", "hourly", 8, "monday"), "frequency"),
        (("UTC", "Daily", 8, "monday"), "frequency"),
        (("UTC", "daily", 24, "monday"), "hour"),
        (("UTC", "daily", -1, "monday"), "hour"),
        (("UTC", "daily", True, "monday"), "hour"),
        (("UTC", "daily", "8", "monday"), "hour"),
        (("UTC", "weekly", 8, "funday"), "weekday"),
        (("UTC", "weekly", 8, 1), "weekday"),
    ],
)
def test_validate_schedule_names_the_field(args: tuple[object, ...], field: str) -> None:
    with pytest.raises(InvalidSubscriberError) as caught:
        validate_schedule(*args)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)


def test_validate_schedule_defaults_and_case() -> None:
    assert validate_schedule("Europe/Berlin", "weekly", None, "Friday") == Schedule(
        "Europe/Berlin", "weekly", 8, "friday"
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": "two\nlines"}, "title"),
        ({"title": 5}, "title"),
        ({"title": "ok", "url": "javascript:alert(1)"}, "url"),
        ({"title": "ok", "url": "ftp://example.com/file"}, "url"),
        ({"title": "ok", "url": "/relative"}, "url"),
        ({"title": "ok", "url": "https://example.com/a b"}, "url"),
        ({"title": "ok", "url": "https://example.com/" + "a" * 2048}, "url"),
        ({"title": "ok", "body": "b" * 2001}, "body"),
        ({"title": "ok", "body": "nul\0"}, "body"),
        ({"title": "ok", "kind": "Comment"}, "kind"),
        ({"title": "ok", "kind": "a" * 33}, "kind"),
        ({"title": "ok", "kind": "<b>"}, "kind"),
    ],
)
def test_validate_item_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidItemError) as caught:
        validate_item(**kwargs)
    assert caught.value.field == field


def test_validate_item_keeps_what_is_given() -> None:
    assert validate_item(" Hi ", url="https://example.com/x?a=1&b=2", body="b", kind="news") == {
        "title": "Hi",
        "url": "https://example.com/x?a=1&b=2",
        "body": "b",
        "kind": "news",
    }
    assert validate_item("Hi") == {"title": "Hi", "kind": "update"}
