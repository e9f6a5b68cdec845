"""Structured state-change lines on `mailqueue.events`, and the counters behind /metrics."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
import time_machine
from flask import Flask
from redis import Redis

from app import digests, events, status
from app.mail import send_email
from tests.digest_helpers import utc
from tests.servers import SMTPServer

LINE = re.compile(r'^(\w+=("([^"\\]|\\.)*"|\S+))( \w+=("([^"\\]|\\.)*"|\S+))*$')


def event_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    """Every mailqueue.events line, checked to be logfmt, as its fields."""
    lines = []
    for record in caplog.records:
        if record.name == "mailqueue.events":
            message = record.getMessage()
            assert LINE.match(message), message
            assert record.mail_event["event"] in message  # type: ignore[attr-defined]
            lines.append({k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', message)})
    return lines


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="mailqueue.events")
    return caplog


def test_a_delivered_mail_logs_queued_sending_sent(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, captured: pytest.LogCaptureFixture
) -> None:
    job = send_email("Ann <ann@example.com>", "Secret subject", "test", address="ctx-value-42")
    work()
    smtp_server.wait_for(1)
    lines = event_lines(captured)
    assert [line["event"] for line in lines] == ["queued", "sending", "sent"]
    for line in lines:
        assert line["mail_id"] == job.id and line["job_id"] == job.id
        assert line["template"] == "test"
    assert [line["attempt"] for line in lines] == ["0", "1", "1"]
    assert lines[0]["recipients"] == "1" and lines[0]["kind"] == "mail"
    everything = "\n".join(r.getMessage() for r in captured.records if r.name == "mailqueue.events")
    for secret in ("ann@example.com", "Secret subject", "ctx-value-42", "test-token"):
        assert secret not in everything


def test_a_deferred_mail_logs_scheduled_with_its_time(
    app_ctx: Flask, captured: pytest.LogCaptureFixture
) -> None:
    send_email("ann@example.com", "Later", "test", delay=3600, address="a")
    [line] = event_lines(captured)
    assert line["event"] == "scheduled" and line["send_at"].startswith("20")


def test_transient_failure_logs_retry_scheduled_and_counts_it(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    work: Any,
    captured: pytest.LogCaptureFixture,
    redis_client: Redis,
) -> None:
    smtp_server.handler.reply = "451 4.3.0 mailbox ann@example.com busy, try later"
    job = send_email("ann@example.com", "Hi", "test", address="a")
    work()
    lines = event_lines(captured)
    assert [line["event"] for line in lines] == ["queued", "sending", "retry_scheduled"]
    retry = lines[-1]
    assert retry["mail_id"] == job.id and retry["attempt"] == "1"
    assert 12 <= int(retry["retry_in"]) <= 18  # 15 s, jittered by 20%
    assert retry["retries_left"] == "8"  # after this one: 9 configured
    assert retry["error"] == "TransientDeliveryError"
    assert "451 4.3.0 mailbox ***@example.com busy" in retry["reason"]
    level = [r.levelno for r in captured.records if r.name == "mailqueue.events"][-1]
    assert level == logging.WARNING
    assert redis_client.hgetall(status.STATS_KEY) == {b"retried:test": b"1"}


def test_permanent_failure_logs_failed_without_the_address_and_counts_it(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    work: Any,
    captured: pytest.LogCaptureFixture,
    redis_client: Redis,
) -> None:
    smtp_server.handler.refuse_rcpt = {"bob@example.com": "550 5.1.1 no such user"}
    send_email("bob@example.com", "Hi", "test", address="a")
    work()
    failed = event_lines(captured)[-1]
    assert failed["event"] == "failed" and failed["error"] == "PermanentDeliveryError"
    assert "bob@" not in failed["reason"] and "***@example.com: 550 5.1.1" in failed["reason"]
    assert redis_client.hgetall(status.STATS_KEY) == {b"failed:test": b"1"}


def test_sent_mails_are_counted_by_template(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    for _ in range(3):
        send_email("ann@example.com", "Hi", "test", address="a")
    work()
    smtp_server.wait_for(3)
    assert redis_client.hgetall(status.STATS_KEY) == {b"sent:test": b"3"}


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        ({"event": "sent", "mail_id": "ab12", "n": 3}, "event=sent mail_id=ab12 n=3"),
        ({"reason": 'say "hi"\nnow'}, r'reason="say \"hi\"\nnow"'),
        ({"empty": ""}, 'empty=""'),
        ({"send_at": "2030-01-01T09:00:00+00:00"}, "send_at=2030-01-01T09:00:00+00:00"),
        ({"path": "a b=c"}, 'path="a b=c"'),
    ],
)
def test_format_fields(fields: dict[str, Any], line: str) -> None:
    assert events.format_fields(fields) == line


def test_a_line_is_the_record_log_log_would_make(captured: pytest.LogCaptureFixture) -> None:
    """emit() builds its record without logging's stack walk: same level, message,
    extra and caller (emit itself) as log.log() gives, and nothing below the level."""
    events.emit("failed", mail_id="ab12", template="test", attempt=2, reason="550 no")
    events.log.log(logging.ERROR, "reference")
    ours, reference = captured.records
    assert (ours.levelno, ours.name) == (reference.levelno, reference.name)
    assert (
        ours.getMessage()
        == 'event=failed mail_id=ab12 job_id=ab12 template=test attempt=2 reason="550 no"'
    )
    assert ours.mail_event["attempt"] == 2  # type: ignore[attr-defined]
    assert (ours.pathname, ours.funcName) == (events.__file__, "emit")
    assert ours.lineno > 0
    captured.clear()
    captured.set_level(logging.WARNING, logger="mailqueue.events")
    events.emit("sent", mail_id="ab12", template="test", attempt=1)
    assert captured.records == []


def test_redact_masks_mailboxes_and_bounds_length() -> None:
    assert events.redact("550 <Bob.Smith+x@mail.example.org> unknown") == (
        "550 <***@mail.example.org> unknown"
    )
    long = events.redact("x" * 1000)
    assert len(long) == events.MAX_REASON and long.endswith("…")


# --- digest mails: the same events and counters -----------------------------------------


def _due_digests(emails: list[str]) -> None:
    for email in emails:
        digests.upsert_subscriber(email, "UTC", "daily", 8)
        digests.add_item(email, f"For {email}")
    assert digests.dispatch_due().enqueued == len(emails)


def test_digests_log_sending_sent_and_failed_and_are_counted(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    work: Any,
    captured: pytest.LogCaptureFixture,
    redis_client: Redis,
) -> None:
    smtp_server.handler.refuse_rcpt = {"bad@example.com": "550 5.1.1 no such user"}
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        _due_digests(["a@example.com", "bad@example.com"])
        work()
    lines = [line for line in event_lines(captured) if line.get("kind") == "digest"]
    assert [(line["event"], line["attempt"]) for line in lines] == [
        ("sending", "1"),
        ("sent", "1"),
        ("sending", "1"),
        ("failed", "1"),
    ]
    assert all(line["template"] == "digest" for line in lines)
    assert lines[0]["items"] == "1" and lines[0]["job_id"] != lines[0]["mail_id"]
    assert "***@example.com: 550 5.1.1" in lines[-1]["reason"]
    everything = "\n".join(r.getMessage() for r in captured.records if r.name == "mailqueue.events")
    assert "bad@example.com" not in everything and "a@example.com" not in everything
    assert redis_client.hgetall(status.STATS_KEY) == {b"sent:digest": b"1", b"failed:digest": b"1"}


def test_a_digest_retry_is_logged_and_counted(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    work: Any,
    captured: pytest.LogCaptureFixture,
    redis_client: Redis,
) -> None:
    smtp_server.handler.reply = "451 4.3.0 try again later"
    with time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        _due_digests(["a@example.com"])
        work()
    [sending, retry] = [line for line in event_lines(captured) if line.get("kind") == "digest"]
    assert sending["event"] == "sending"
    assert retry["event"] == "retry_scheduled" and retry["attempt"] == "1"
    assert retry["mail_id"] == sending["mail_id"] and int(retry["retry_in"]) > 0
    assert redis_client.hgetall(status.STATS_KEY) == {b"retried:digest": b"1"}
