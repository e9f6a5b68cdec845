"""Digests end to end against the real Redis and SMTP server, the clock moved by time-machine.

The dispatcher tests drive `dispatch_due()` every five minutes of simulated time,
as the scheduler's cron would, and look at what it handed to digest jobs; the
delivery tests run the jobs in an AppWorker and look at what the SMTP server got.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.exceptions
import time_machine
from flask import Flask
from redis import Redis

from app import digests, status
from app.errors import InvalidItemError, SubscriberNotFoundError, TransientDeliveryError
from app.mail import build_message
from app.queues import DIGEST_QUEUE, get_queue
from app.smtp import Mailer
from jobs.digest import send_digests
from tests.digest_helpers import (
    bulk_subscribers,
    queued_pairs,
    run_dispatcher,
    utc,
)
from tests.helpers import counting_redis_writes, scheduler_pass
from tests.servers import SMTPServer

ANN = "ann@example.com"


# --- when digests go out -------------------------------------------------------------------

# zone, first local day, hour -> when (UTC, 2026) each of three local days is dispatched.
DST_CASES = [
    # Berlin springs forward on 2026-03-29 (02:00 CET -> 03:00 CEST, at 01:00 UTC).
    ("Europe/Berlin", "2026-03-28", 2, ["03-28 01:00", "03-29 01:00", "03-30 00:00"]),
    ("Europe/Berlin", "2026-03-28", 1, ["03-28 00:00", "03-29 00:00", "03-29 23:00"]),
    ("Europe/Berlin", "2026-03-28", 3, ["03-28 02:00", "03-29 01:00", "03-30 01:00"]),
    # Berlin falls back on 2026-10-25 (03:00 CEST -> 02:00 CET): 02:xx happens twice.
    ("Europe/Berlin", "2026-10-24", 2, ["10-24 00:00", "10-25 00:00", "10-26 01:00"]),
    ("Europe/Berlin", "2026-10-24", 1, ["10-23 23:00", "10-24 23:00", "10-26 00:00"]),
    # New York springs forward on 2026-03-08 (02:00 EST -> 03:00 EDT, at 07:00 UTC).
    ("America/New_York", "2026-03-07", 2, ["03-07 07:00", "03-08 07:00", "03-09 06:00"]),
    ("America/New_York", "2026-03-07", 1, ["03-07 06:00", "03-08 06:00", "03-09 05:00"]),
    # New York falls back on 2026-11-01 (02:00 EDT -> 01:00 EST): 01:xx happens twice.
    ("America/New_York", "2026-10-31", 1, ["10-31 05:00", "11-01 05:00", "11-02 06:00"]),
    ("America/New_York", "2026-10-31", 2, ["10-31 06:00", "11-01 07:00", "11-02 07:00"]),
]


@pytest.mark.parametrize(("zone", "first_day", "hour", "expected"), DST_CASES)
def test_dst_days_get_exactly_one_digest_at_the_right_instant(
    app_ctx: Flask, zone: str, first_day: str, hour: int, expected: list[str]
) -> None:
    tz = ZoneInfo(zone)
    start = datetime.fromisoformat(f"{first_day}T00:00").replace(tzinfo=tz).astimezone(UTC)
    end = start + timedelta(days=3) - timedelta(minutes=5)
    with time_machine.travel(start, tick=False) as traveller:
        digests.upsert_subscriber(ANN, zone, "daily", hour=hour)
        sent = run_dispatcher(traveller, start, end)
    day = datetime.fromisoformat(first_day).date()
    periods = [(day + timedelta(days=n)).isoformat() for n in range(3)]
    instants = [utc(f"2026-{when.replace(' ', 'T')}") for when in expected]
    assert [(d.period, d.at) for d in sent] == list(zip(periods, instants, strict=True))


@pytest.mark.parametrize(("zone", "hour"), [("Europe/Berlin", 2), ("America/New_York", 1)])
def test_fall_back_day_delivers_one_mail_per_day_with_items_arriving_all_the_time(
    app_ctx: Flask, smtp_server: SMTPServer, zone: str, hour: int
) -> None:
    """The repeated hour of a fall-back night (02:xx in Berlin, 01:xx in New York) is
    walked through twice by the clock; its digest still goes out once."""
    tz = ZoneInfo(zone)
    start = datetime(2026, 10, 24 if zone == "Europe/Berlin" else 31, tzinfo=tz).astimezone(UTC)

    def new_item(moment: datetime) -> None:
        if moment.minute % 30 == 0:
            digests.add_item(ANN, f"item at {moment:%d %H:%M}")

    with time_machine.travel(start, tick=False) as traveller:
        digests.upsert_subscriber(ANN, zone, "daily", hour=hour)
        sent = run_dispatcher(
            traveller, start, start + timedelta(days=3, minutes=-5), deliver=True,
            every_step=new_item,
        )  # fmt: skip
    assert len(sent) == 3
    received = smtp_server.wait_for(3)
    assert len(received) == 3 and len({r.message_id for r in received}) == 3
    texts = [r.part("text/plain") for r in received]
    # Every item went out exactly once, across the three digests.
    items = [line for text in texts for line in text.splitlines() if line.startswith("* item")]
    assert len(items) == len(set(items))


@pytest.mark.parametrize(
    "zone",
    [
        "Pacific/Kiritimati",  # UTC+14
        "Pacific/Auckland",  # +13 in November (DST)
        "Asia/Kolkata",  # +05:30
        "Europe/London",
        "America/St_Johns",  # -03:30
        "Pacific/Pago_Pago",  # -11
    ],
)
def test_each_time_zone_gets_its_digest_at_its_own_8_oclock(app_ctx: Flask, zone: str) -> None:
    tz = ZoneInfo(zone)
    start = datetime(2026, 11, 26, 0, 0, tzinfo=tz).astimezone(UTC)
    with time_machine.travel(start, tick=False) as traveller:
        digests.upsert_subscriber(ANN, zone, "daily")
        sent = run_dispatcher(traveller, start, start + timedelta(days=2, minutes=-5))
    assert [(d.period, d.at) for d in sent] == [
        ("2026-11-26", datetime(2026, 11, 26, 8, tzinfo=tz).astimezone(UTC)),
        ("2026-11-27", datetime(2026, 11, 27, 8, tzinfo=tz).astimezone(UTC)),
    ]


def test_weekly_goes_out_on_the_chosen_weekday_once_per_iso_week(app_ctx: Flask) -> None:
    la = ZoneInfo("America/Los_Angeles")
    start = datetime(2026, 11, 2, 0, 0, tzinfo=la).astimezone(UTC)  # Monday of 2026-W45
    with time_machine.travel(start, tick=False) as traveller:
        digests.upsert_subscriber(ANN, "America/Los_Angeles", "weekly", 9, "wednesday")
        digests.upsert_subscriber("bo@example.com", "Pacific/Auckland", "weekly", 8, "monday")
        sent = run_dispatcher(traveller, start, start + timedelta(days=21), timedelta(minutes=15))
    ann = [(d.period, d.at) for d in sent if d.email == ANN]
    assert ann == [
        ("2026-W45", utc("2026-11-04T17:00")),  # Wednesday 09:00 PST
        ("2026-W46", utc("2026-11-11T17:00")),
        ("2026-W47", utc("2026-11-18T17:00")),
    ]
    bo = [(d.period, d.at) for d in sent if d.email == "bo@example.com"]
    # Monday 08:00 in Auckland is Sunday 19:00 UTC: the period is the local ISO week. It
    # was Monday evening there at sign-up, so this week's digest was due at once.
    assert bo == [
        ("2026-W45", start),
        ("2026-W46", utc("2026-11-08T19:00")),
        ("2026-W47", utc("2026-11-15T19:00")),
        ("2026-W48", utc("2026-11-22T19:00")),
    ]


def test_catch_up_after_a_gap_sends_the_current_period_late_never_a_backlog(
    app_ctx: Flask,
) -> None:
    tokyo = ZoneInfo("Asia/Tokyo")

    def local(day: int, hour: int) -> datetime:
        return datetime(2026, 11, day, hour, tzinfo=tokyo).astimezone(UTC)

    with time_machine.travel(local(26, 6), tick=False) as traveller:
        digests.upsert_subscriber(ANN, "Asia/Tokyo", "daily", 8)
        # The scheduler is down from 07:55 to 11:00 local: 08:00 passes unseen.
        assert run_dispatcher(traveller, local(26, 6), local(26, 7) + timedelta(minutes=55)) == []
        late = run_dispatcher(traveller, local(26, 11), local(27, 7))
        assert [(d.period, d.at) for d in late] == [("2026-11-26", local(26, 11))]
        on_time = run_dispatcher(traveller, local(27, 7) + timedelta(minutes=5), local(27, 9))
        assert [(d.period, d.at) for d in on_time] == [("2026-11-27", local(27, 8))]
        # Down for three days: one digest, for today, when it comes back.
        back = run_dispatcher(traveller, local(30, 10), local(30, 23))
        assert [(d.period, d.at) for d in back] == [("2026-11-30", local(30, 10))]


def test_dispatch_is_idempotent_and_one_mail_goes_out(
    app_ctx: Flask, work: Any, smtp_server: SMTPServer
) -> None:
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        digests.upsert_subscriber(ANN, "UTC", "daily", 8)
        digests.add_item(ANN, "Hello")
        first = digests.dispatch_due()
        second = digests.dispatch_due()
        assert (first.due, first.enqueued, first.skipped, first.jobs) == (1, 1, 0, 1)
        assert (second.due, second.enqueued, second.skipped) == (0, 0, 0)
        work()
        third = digests.dispatch_due()
        assert third.enqueued == 0
        # Saving the same settings again does not make the period due again.
        digests.upsert_subscriber(ANN, "UTC", "daily", 8)
        assert digests.dispatch_due().enqueued == 0
    assert len(smtp_server.wait_for(1)) == 1
    time.sleep(0)  # nothing else may arrive: the worker has finished (burst)
    assert len(smtp_server.messages) == 1


def test_changing_the_schedule_never_repeats_a_handled_period(app_ctx: Flask) -> None:
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False) as traveller:
        digests.upsert_subscriber(ANN, "UTC", "daily", 8)
        assert queued_pairs() == [] and digests.dispatch_due().enqueued == 1
        assert queued_pairs() == [(ANN, "2026-11-27")]
        # Moving west makes 08:00 of "2026-11-27" lie ahead again: it is not sent twice.
        digests.upsert_subscriber(ANN, "America/Los_Angeles", "daily", 8)
        sent = run_dispatcher(traveller, utc("2026-11-27T09:05"), utc("2026-11-28T20:00"))
    assert [(d.period, d.at) for d in sent] == [("2026-11-28", utc("2026-11-28T16:00"))]


def _send_due() -> dict[str, int]:
    digests.dispatch_due()
    counts: Counter[str] = Counter()
    for pair in queued_pairs():
        counts.update(send_digests([list(pair)]))
    return dict(counts)


def test_switching_daily_weekly_daily_forgets_nothing_sent(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    """Each kind keeps its own record of what was sent: back on daily the same day,
    today's digest is not due again (it was sent), and the items that came since go
    out the next morning, none dropped; back on weekly, the week is not sent twice."""
    with time_machine.travel(utc("2026-11-25T08:30"), tick=False) as traveller:  # Wed
        _due_subscriber()
        digests.add_item(ANN, "Daily one")
        assert _send_due() == {"sent": 1}
        traveller.move_to(utc("2026-11-25T10:00"))
        digests.upsert_subscriber(ANN, "UTC", "weekly", 8, "monday")
        digests.add_item(ANN, "Weekly one")
        assert _send_due() == {"sent": 1}  # this ISO week's, due since Monday 08:00
        traveller.move_to(utc("2026-11-25T11:00"))
        digests.upsert_subscriber(ANN, "UTC", "daily", 8)
        digests.add_item(ANN, "After switching back")
        assert _send_due() == {}  # today's daily went out at 08:30
        assert redis_client.llen(digests.items_key(ANN)) == 1
        traveller.move_to(utc("2026-11-26T08:00"))
        assert _send_due() == {"sent": 1}
        traveller.move_to(utc("2026-11-26T09:00"))
        digests.upsert_subscriber(ANN, "UTC", "weekly", 8, "monday")
        digests.add_item(ANN, "Next week")
        assert _send_due() == {}  # 2026-W48 went out yesterday
        traveller.move_to(utc("2026-11-30T08:00"))
        assert _send_due() == {"sent": 1}
    received = smtp_server.wait_for(4)
    texts = [r.part("text/plain") for r in received]
    for title, text in zip(
        ["Daily one", "Weekly one", "After switching back", "Next week"], texts, strict=True
    ):
        assert title in text
    sub = digests.get_subscriber(ANN)
    assert sub is not None and sub.marks() == ("2026-W49", "2026-W49")
    assert sub.marks("daily") == ("2026-11-26", "2026-11-26")


def test_a_subscriber_written_before_per_kind_marks_keeps_its_last_period(
    app_ctx: Flask, redis_client: Redis
) -> None:
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        _due_subscriber()
        # As an older version left it: one last_period / dispatched for both kinds.
        redis_client.hset(
            digests.sub_key(ANN), mapping={"last_period": "2026-11-27", "dispatched": "2026-11-27"}
        )
        assert digests.dispatch_due().enqueued == 0
        sub = digests.get_subscriber(ANN)
        assert sub is not None and sub.marks() == ("2026-11-27", "2026-11-27")
        assert sub.marks("weekly") == ("", "")


def test_off_and_deleted_subscribers_are_skipped(app_ctx: Flask, redis_client: Redis) -> None:
    with time_machine.travel(utc("2026-11-27T06:00"), tick=False) as traveller:
        for name in ("a", "b", "c"):
            digests.upsert_subscriber(f"{name}@example.com", "UTC", "daily", 8)
        digests.upsert_subscriber("b@example.com", "UTC", "off")
        # c is deleted behind the index's back (as if a crash had left its entry).
        redis_client.delete(digests.sub_key("c@example.com"))
        redis_client.zadd(digests.DUE_KEY, {"c@example.com": 0})
        traveller.move_to(utc("2026-11-27T08:00"))
        result = digests.dispatch_due()
    assert (result.due, result.enqueued, result.skipped) == (2, 1, 1)
    assert queued_pairs() == [("a@example.com", "2026-11-27")]
    assert redis_client.zscore(digests.DUE_KEY, "c@example.com") is None


def test_two_dispatchers_racing_never_hand_out_a_subscriber_twice(
    app: Flask, redis_client: Redis
) -> None:
    emails = [f"user{n}@example.com" for n in range(3000)]
    bulk_subscribers(redis_client, emails, ["UTC", "Europe/Berlin", "Asia/Tokyo"], due=0, hour=0)
    barrier = threading.Barrier(4)
    results: list[digests.DispatchResult] = []
    errors: list[BaseException] = []

    def dispatcher() -> None:
        try:
            with app.app_context():
                barrier.wait()
                results.append(digests.dispatch_due(batch=50))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=dispatcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sum(r.enqueued for r in results) == 3000
    assert sum(1 for r in results if r.enqueued) >= 2  # they really raced
    with app.app_context():
        pairs = queued_pairs()
    assert len(pairs) == 3000 and {e for e, _ in pairs} == set(emails)


# --- what a digest job does ----------------------------------------------------------------


def _due_subscriber(email: str = ANN, zone: str = "UTC") -> None:
    digests.upsert_subscriber(email, zone, "daily", 8)


def test_digest_mime_headers_grouping_escaping_and_links(
    app_ctx: Flask, client: Any, auth: dict[str, str], work: Any, smtp_server: SMTPServer
) -> None:
    with time_machine.travel(utc("2026-11-27T06:00"), tick=False) as traveller:
        _due_subscriber(zone="Europe/Berlin")
        digests.add_item(ANN, "Old news", url="https://example.com/old", kind="news")
        traveller.shift(60)
        digests.add_item(ANN, "A comment", body="Nice & <clear>", kind="comment")
        traveller.shift(60)
        digests.add_item(
            ANN,
            "Fresh <news> & more",
            url="https://example.com/n?a=1&b=2",
            body="<script>alert(1)</script>\nsecond line",
            kind="news",
        )
        traveller.move_to(utc("2026-11-27T07:00"))  # 08:00 in Berlin
        assert digests.dispatch_due().enqueued == 1
        work()
    [received] = smtp_server.wait_for(1)
    msg = received.message
    sub = digests.get_subscriber(ANN)
    assert sub is not None
    mail_id = digests.digest_mail_id(ANN, "2026-11-27", sub.gen)
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["Subject"] == "[Example] Your daily digest: 3 new items"
    assert received.rcpt_tos == [ANN]
    assert msg["Message-ID"] == f"<{mail_id}@example.com>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    unsubscribe = str(msg["List-Unsubscribe"])
    prefix = "<https://mail.example.com/unsubscribe/"
    assert unsubscribe.startswith(prefix) and unsubscribe.endswith(">")
    assert digests.read_unsubscribe_token(unsubscribe[len(prefix) : -1]) == ANN
    assert b"List-Unsubscribe: <https://mail.example.com/unsubscribe/" in received.raw
    text = received.part("text/plain")
    html = received.part("text/html")
    # Groups: the one with the newest item first; inside, newest first.
    assert text.index("News") < text.index("Fresh <news> & more") < text.index("Old news")
    assert text.index("Old news") < text.index("Comment") < text.index("A comment")
    assert "https://example.com/n?a=1&b=2" in text and "https://example.com/old" in text
    assert "Unsubscribe: https://mail.example.com/unsubscribe/" in text
    assert "Fresh &lt;news&gt; &amp; more" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "Nice &amp; &lt;clear&gt;" in html
    # Links keep their href, with the layout's CSS inlined (app.mail.inline_css).
    assert '<a href="https://example.com/n?a=1&amp;b=2" style="color: #2563eb;">' in html
    assert '<a href="https://example.com/old" style="color: #2563eb;">Old news</a>' in html
    assert "Fri 27 Nov, 07:02" in text  # when, in the subscriber's time zone
    record = client.get(f"/api/mail/{mail_id}", headers=auth).get_json()
    assert record["status"] == "sent" and record["kind"] == "digest" and record["to"] == [ANN]


def test_no_items_means_no_mail_but_the_period_is_handled(
    app_ctx: Flask, work: Any, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        _due_subscriber()
        assert digests.dispatch_due().enqueued == 1
        work()
    assert smtp_server.messages == []
    sub = digests.get_subscriber(ANN)
    assert sub is not None and sub.last_period == "2026-11-27"
    assert redis_client.keys("mq:mail:*") == []


class SimulatedCrash(BaseException):
    """Stands for the worker process dying: nothing in the job catches it."""


def crash(*args: Any, **kwargs: Any) -> None:
    raise SimulatedCrash


def test_a_crash_between_claim_and_send_loses_nothing_and_sends_once(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False) as traveller:
        _due_subscriber()
        digests.add_item(ANN, "First")
        digests.add_item(ANN, "Second")
        digests.dispatch_due()
        [pair] = queued_pairs()

        monkeypatch.setattr("jobs.digest.build_message", crash)
        with pytest.raises(SimulatedCrash):
            send_digests([list(pair)])
        claimed = digests.claimed_key(ANN, "2026-11-27")
        assert redis_client.llen(claimed) == 2 and redis_client.llen(digests.items_key(ANN)) == 0
        digests.add_item(ANN, "Arrived after the crash")
        monkeypatch.undo()
        assert send_digests([list(pair)]) == {"sent": 1}
        assert send_digests([list(pair)]) == {"handled": 1}  # a duplicate run does nothing
        [received] = smtp_server.wait_for(1)
        assert "First" in received.part("text/plain") and "Second" in received.part("text/plain")
        assert "Arrived after the crash" not in received.part("text/plain")
        assert redis_client.exists(claimed) == 0
        # The late item is the next day's digest.
        traveller.move_to(utc("2026-11-28T08:00"))
        digests.dispatch_due()
        assert send_digests([list(p) for p in queued_pairs()]) == {"sent": 1}
    messages = smtp_server.wait_for(2)
    assert len(messages) == 2
    assert "Arrived after the crash" in messages[1].part("text/plain")
    assert "First" not in messages[1].part("text/plain")


def test_a_crash_after_claiming_the_next_digest_ahead_sends_it_once_its_lease_lapses(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settle of `a` claimed `b`'s attempt; the worker dies rendering `b`. Like a
    death mid-send, `b` waits for its lease (job timeout + grace), then goes out once."""
    emails = ["a@example.com", "b@example.com"]
    pairs = [[email, "2026-11-27"] for email in emails]
    real_build = build_message

    def build_or_crash(record: status.MailRecord, context: Any = None) -> Any:
        if record.to == ["b@example.com"]:
            raise SimulatedCrash
        return real_build(record, context)

    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        for email in emails:
            _due_subscriber(email)
            digests.add_item(email, f"For {email}")
        with monkeypatch.context() as patch, pytest.raises(SimulatedCrash):
            patch.setattr("jobs.digest.build_message", build_or_crash)
            send_digests(pairs)
        b = digests.get_subscriber("b@example.com")
        assert b is not None
        b_id = digests.digest_mail_id(b.email, "2026-11-27", b.gen)
        record = status.load(redis_client, b_id)
        assert record is not None and record.status == status.SENDING
        lease = app_ctx.config["MAIL_JOB_TIMEOUT"] + status.LEASE_GRACE_SECONDS
        assert lease - 5 <= redis_client.ttl(status.lease_key(b_id)) <= lease
        # While the lease lives, a retry leaves `b` alone (and `a` is handled).
        with pytest.raises(TransientDeliveryError):
            send_digests(pairs)
        assert len(smtp_server.wait_for(1)) == 1
        # Redis expires the lease on its own clock; the clock moved only in this process.
        redis_client.delete(status.lease_key(b_id))
        assert send_digests(pairs) == {"handled": 1, "sent": 1}
    received = smtp_server.wait_for(2)
    assert sorted(r.rcpt_tos[0] for r in received) == emails
    record = status.load(redis_client, b_id)
    assert record is not None and record.status == status.SENT and record.attempts == 2
    assert redis_client.exists(digests.claimed_key(b.email, "2026-11-27")) == 0


def test_a_digest_accepted_during_a_short_redis_outage_is_recorded_once(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for transactional mail: the settle that records `sent` is retried through a
    brief outage, so the accepted digest is not sent again after its lease."""
    real_settle = digests.settle
    failures: list[str] = []

    def settle_flaky(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("mail_status") == status.SENT and len(failures) < 3:
            failures.append("down")
            raise redis.exceptions.ConnectionError("Redis restarting")
        return real_settle(*args, **kwargs)

    monkeypatch.setattr(digests, "settle", settle_flaky)
    emails = ["a@example.com", "b@example.com"]
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        for email in emails:
            _due_subscriber(email)
            digests.add_item(email, f"For {email}")
        assert send_digests([[e, "2026-11-27"] for e in emails]) == {"sent": 2}
    assert len(failures) == 3
    received = smtp_server.wait_for(2)
    assert sorted(r.rcpt_tos[0] for r in received) == emails
    for email in emails:
        sub = digests.get_subscriber(email)
        assert sub is not None
        record = status.load(redis_client, digests.digest_mail_id(email, "2026-11-27", sub.gen))
        assert record is not None and record.status == status.SENT and record.attempts == 1
        assert redis_client.exists(digests.claimed_key(email, "2026-11-27")) == 0


def test_items_arriving_during_a_send_go_to_the_next_digest(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_send = Mailer.send

    def send_while_items_arrive(self: Mailer, message: Any) -> dict[str, str]:
        digests.add_item(ANN, "During the send")
        return real_send(self, message)

    monkeypatch.setattr(Mailer, "send", send_while_items_arrive)
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False) as traveller:
        _due_subscriber()
        digests.add_item(ANN, "Before")
        digests.dispatch_due()
        assert send_digests([list(p) for p in queued_pairs()]) == {"sent": 1}
        assert redis_client.llen(digests.items_key(ANN)) == 1
        monkeypatch.setattr(Mailer, "send", real_send)
        traveller.move_to(utc("2026-11-28T08:00"))
        digests.dispatch_due()
        assert send_digests([list(p) for p in queued_pairs()]) == {"sent": 1}
    first, second = smtp_server.wait_for(2)
    assert "Before" in first.part("text/plain")
    assert "During the send" not in first.part("text/plain")
    assert "During the send" in second.part("text/plain")


def test_transient_smtp_failure_retries_and_sends_each_digest_once(
    app_ctx: Flask, work: Any, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    emails = ["a@example.com", "b@example.com", "c@example.com"]
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False) as traveller:
        for email in emails:
            _due_subscriber(email)
            digests.add_item(email, f"For {email}")
        assert digests.dispatch_due().jobs == 1
        smtp_server.handler.reply = "451 4.3.0 try again later"
        work()
        assert smtp_server.messages == []
        # The server refused the first mail: the chunk stopped there instead of
        # trying (and timing out on) the others; every claim is kept for the retry.
        gens = {e: digests.get_subscriber(e).gen for e in emails}  # type: ignore[union-attr]
        ids = {e: digests.digest_mail_id(e, "2026-11-27", gens[e]) for e in emails}
        first = status.load(redis_client, ids["a@example.com"])
        assert first is not None and first.status == status.RETRYING
        assert "451" in first.last_error
        assert status.load(redis_client, ids["b@example.com"]) is None
        for email in emails:
            assert redis_client.llen(digests.claimed_key(email, "2026-11-27")) == 1
        smtp_server.handler.reply = None
        traveller.shift(3600)  # past the retry interval: RQ's scheduler moves it back
        scheduler_pass(redis_client)
        work()
    received = smtp_server.wait_for(3)
    assert sorted(r.rcpt_tos[0] for r in received) == emails
    for email in emails:
        record = status.load(redis_client, ids[email])
        assert record is not None and record.status == status.SENT
        assert redis_client.exists(digests.claimed_key(email, "2026-11-27")) == 0


def test_permanent_failure_of_one_subscriber_does_not_block_the_chunk(
    app_ctx: Flask, work: Any, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    emails = ["a@example.com", "bad@example.com", "c@example.com"]
    smtp_server.handler.refuse_rcpt = {"bad@example.com": "550 5.1.1 no such user"}
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        for email in emails:
            _due_subscriber(email)
            digests.add_item(email, f"For {email}")
        digests.dispatch_due()
        work()
    received = smtp_server.wait_for(2)
    assert sorted(r.rcpt_tos[0] for r in received) == ["a@example.com", "c@example.com"]
    bad = digests.get_subscriber("bad@example.com")
    assert bad is not None and bad.last_period == "2026-11-27"
    record = status.load(redis_client, digests.digest_mail_id(bad.email, "2026-11-27", bad.gen))
    assert record is not None and record.status == status.FAILED and "550" in record.last_error
    # Its items are not lost: they wait for the next digest.
    assert redis_client.llen(digests.items_key("bad@example.com")) == 1
    queue = get_queue(DIGEST_QUEUE)
    assert queue.failed_job_registry.count == 0


def test_a_digest_after_another_costs_one_round_trip(
    app_ctx: Flask, smtp_server: SMTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim of the chunk, the first digest's attempt, then one settle per digest
    (which claims the next digest's attempt too)."""
    emails = [f"s{i}@example.com" for i in range(20)]
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        for email in emails:
            _due_subscriber(email)
            digests.add_item(email, f"For {email}")
        pairs = [[email, "2026-11-27"] for email in emails]
        with counting_redis_writes(monkeypatch) as sends:
            assert send_digests(pairs) == {"sent": len(emails)}
    assert len(smtp_server.wait_for(len(emails))) == len(emails)
    assert len(sends) == len(emails) + 2


def test_a_render_error_in_a_digest_claimed_ahead_fails_it_and_frees_its_lease(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    emails = ["a@example.com", "b@example.com", "c@example.com"]
    real_context = digests.digest_context

    def context(subscriber: digests.Subscriber, *args: Any) -> dict[str, Any]:
        if subscriber.email == "b@example.com":
            raise ValueError("a broken item")
        return real_context(subscriber, *args)

    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        for email in emails:
            _due_subscriber(email)
            digests.add_item(email, f"For {email}")
        monkeypatch.setattr(digests, "digest_context", context)
        counts = send_digests([[email, "2026-11-27"] for email in emails])
    assert counts == {"sent": 2, "failed": 1}
    received = smtp_server.wait_for(2)
    assert sorted(r.rcpt_tos[0] for r in received) == ["a@example.com", "c@example.com"]
    b = digests.get_subscriber("b@example.com")
    assert b is not None and b.last_period == "2026-11-27"
    mail_id = digests.digest_mail_id(b.email, "2026-11-27", b.gen)
    record = status.load(redis_client, mail_id)
    assert record is not None and record.status == status.FAILED
    assert "a broken item" in record.last_error
    assert redis_client.exists(status.lease_key(mail_id)) == 0
    assert redis_client.llen(digests.items_key(b.email)) == 1  # kept for the next digest


# --- subscribers and items -----------------------------------------------------------------


def test_upsert_reports_created_and_keeps_settings(app_ctx: Flask) -> None:
    assert digests.upsert_subscriber("Ann@Example.COM", "Europe/Berlin", "weekly", 7, "Friday")
    assert not digests.upsert_subscriber(ANN, "Europe/Berlin", "daily", 7, "friday")
    sub = digests.get_subscriber(ANN)
    assert sub is not None and sub.email == ANN
    assert digests.get_subscriber("ANN@example.com") == sub
    view = digests.describe_subscriber(ANN)
    assert view["frequency"] == "daily" and view["weekday"] == "friday" and view["hour"] == 7


def test_add_item_unknown_off_and_capped(app_ctx: Flask, redis_client: Redis) -> None:
    with pytest.raises(SubscriberNotFoundError):
        digests.add_item("nobody@example.com", "Hi")
    with pytest.raises(InvalidItemError):
        digests.add_item(ANN, "")
    _due_subscriber()
    app_ctx.config["DIGEST_MAX_ITEMS"] = 3
    counts = [digests.add_item(ANN, f"item {n}") for n in range(5)]
    assert counts == [1, 2, 3, 3, 3]
    raw_items = redis_client.lrange(digests.items_key(ANN), 0, -1)
    titles = [json.loads(raw)["title"] for raw in raw_items]
    assert titles == ["item 2", "item 3", "item 4"]  # the oldest dropped
    digests.upsert_subscriber(ANN, "UTC", "off")
    assert digests.add_item(ANN, "ignored") is None
    assert redis_client.llen(digests.items_key(ANN)) == 3


def test_delete_forgets_the_subscriber_and_everything_pending(
    app_ctx: Flask, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        _due_subscriber()
        digests.add_item(ANN, "claimed")
        digests.dispatch_due()
        pairs = [list(p) for p in queued_pairs()]
        monkeypatch.setattr("jobs.digest.build_message", crash)
        with pytest.raises(SimulatedCrash):
            send_digests(pairs)
        digests.add_item(ANN, "pending")
        assert redis_client.keys(f"*{ANN}*")
        assert digests.delete_subscriber(ANN)
        assert not digests.delete_subscriber(ANN)
    assert redis_client.keys(f"*{ANN}*") == []
    assert redis_client.zscore(digests.DUE_KEY, ANN) is None
    monkeypatch.undo()
    assert send_digests(pairs) == {"gone": 1}


def test_preview_renders_without_claiming_anything(app_ctx: Flask, redis_client: Redis) -> None:
    with time_machine.travel(utc("2026-11-27T05:00"), tick=False):
        _due_subscriber()
        digests.add_item(ANN, "Pending <one>", url="https://example.com/1")
        shown = digests.preview(ANN)
    assert shown.period == "2026-11-27" and shown.due == utc("2026-11-27T08:00")
    assert shown.items == 1 and shown.subject == "Your daily digest: 1 new item"
    assert "Pending <one>" in shown.rendered.text
    assert shown.rendered.html is not None and "Pending &lt;one&gt;" in shown.rendered.html
    assert redis_client.llen(digests.items_key(ANN)) == 1
    assert redis_client.keys("*claimed*") == [] and redis_client.keys("mq:mail:*") == []
    with pytest.raises(SubscriberNotFoundError):
        digests.preview("nobody@example.com")


# --- scale -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_dispatching_100k_due_subscribers_takes_under_10_seconds(
    app_ctx: Flask, redis_client: Redis
) -> None:
    emails = [f"user{n}@example.com" for n in range(100_000)]
    zones = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Asia/Kolkata",
             "Pacific/Auckland", "America/Los_Angeles", "Europe/London"]  # fmt: skip
    with time_machine.travel(utc("2026-11-27T23:30"), tick=True):
        bulk_subscribers(redis_client, emails, zones, due=0, hour=0)
        started = time.perf_counter()
        result = digests.dispatch_due()
        elapsed = time.perf_counter() - started
        dispatched_at = time.time()  # the travelled clock's (the real one moves on)
    print(f"\ndispatch of 100,000 due subscribers: {elapsed:.2f} s ({result})")
    assert (result.due, result.enqueued, result.jobs) == (100_000, 100_000, 1000)
    assert elapsed < 10
    assert get_queue(DIGEST_QUEUE).count == 1000
    assert redis_client.zcount(digests.DUE_KEY, "-inf", dispatched_at) == 0
    periods = Counter(p for _, p in queued_pairs())
    assert sum(periods.values()) == 100_000
