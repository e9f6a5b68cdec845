"""The suppression list: its store, API and CLI, its effect at enqueue and at delivery,
and what SMTP refusals (through the real recording SMTP server) put on it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from app import deliverability, digests, status, suppression
from app.mail import send_email, send_many
from app.queues import get_redis
from jobs.digest import send_digests
from tests.servers import SMTPServer


def record_of(redis: Redis, mail_id: str) -> status.MailRecord:
    record = status.load(redis, mail_id)
    assert record is not None
    return record


@pytest.mark.parametrize(
    ("reply", "hard"),
    [
        ("550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown", True),
        ("550 5.1.2 Host or domain name not found", True),
        ("556 5.1.10 Recipient address has null MX", True),
        ("550 No such user here", True),
        ("550 Requested action not taken: mailbox unavailable or not local", True),
        ("553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", False),
        ("550 5.7.1 Message rejected as spam; user unknown to our policy", False),
        ("552 5.2.2 Mailbox full", False),
        ("450 4.1.1 Recipient address rejected: User unknown (try later)", False),
        ("550 5.7.26 Unauthenticated email is not accepted", False),
    ],
)
def test_which_refusals_say_the_address_does_not_exist(reply: str, hard: bool) -> None:
    assert suppression.is_hard_bounce(reply) is hard


def test_a_mail_to_a_suppressed_address_never_reaches_the_server(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    deliverability.suppress("Gone@Example.com", suppression.HARD_BOUNCE, "cli", "550 5.1.1")
    job = send_email("Gone Person <gone@example.com>", "Hello", "test", address="x")
    record = record_of(redis_client, job.id)
    assert record.status == status.SUPPRESSED
    assert record.suppressed == {"Gone Person <gone@example.com>": "hard_bounce"}
    assert "hard_bounce" in record.last_error
    assert redis_client.ttl(status.key(job.id)) > 0  # finished: it expires like a sent one
    assert get_queue_len(redis_client) == 0  # no job at all
    work()
    assert smtp_server.messages == []
    assert redis_client.hget(status.STATS_KEY, "suppressed:test") == b"1"
    from app.metrics import render

    assert 'mailqueue_mails_suppressed_total{template="test"} 1' in render()


def get_queue_len(redis: Redis) -> int:
    return int(redis.llen("rq:queue:mail"))


def test_suppressed_recipients_are_dropped_and_listed_the_others_get_it(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    deliverability.suppress("bob@example.com", suppression.COMPLAINT, "api")
    ids = send_many(
        [
            {"to": ["ann@example.com", "bob@example.com"], "subject": "A", "template": "test"},
            {"to": "bob@example.com", "subject": "B", "template": "test"},
            {"to": "cy@example.com", "subject": "C", "template": "test"},
        ]
    )
    work()
    received = smtp_server.wait_for(2)
    assert sorted(r.rcpt_tos[0] for r in received) == ["ann@example.com", "cy@example.com"]
    assert all(len(r.rcpt_tos) == 1 for r in received)
    first, second, third = (record_of(redis_client, i) for i in ids)
    assert first.status == status.SENT and first.suppressed == {"bob@example.com": "complaint"}
    assert second.status == status.SUPPRESSED
    assert third.status == status.SENT and not third.suppressed


def test_an_address_suppressed_while_its_mail_waits_is_checked_again_at_delivery(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis, client: FlaskClient,
    auth: dict[str, str],
) -> None:  # fmt: skip
    alone = send_email("late@example.com", "Hello", "test", address="x")
    shared = send_email(["late@example.com", "ann@example.com"], "Hi", "test", address="x")
    deliverability.suppress("late@example.com", suppression.MANUAL, "cli")
    work()
    [received] = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["ann@example.com"]
    assert record_of(redis_client, alone.id).status == status.SUPPRESSED
    view = client.get(f"/api/mail/{alone.id}", headers=auth).get_json()
    assert view["status"] == "suppressed" and view["suppressed"] == {"late@example.com": "manual"}
    assert record_of(redis_client, shared.id).suppressed == {"late@example.com": "manual"}


def test_cc_and_bcc_are_checked_at_enqueue_and_again_at_delivery(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    """cc and bcc live in the record's `extras`: the attempt claim reads them there."""
    deliverability.suppress("cc-early@example.com", suppression.HARD_BOUNCE, "api")
    job = send_email(
        "ann@example.com",
        "Hi",
        "test",
        cc=["cc-early@example.com", "cc-late@example.com", "bob@example.com"],
        bcc=["bcc-late@example.com", "carl@example.com"],
        address="x",
    )
    assert record_of(redis_client, job.id).suppressed == {"cc-early@example.com": "hard_bounce"}
    deliverability.suppress("cc-late@example.com", suppression.COMPLAINT, "ses")
    deliverability.suppress("bcc-late@example.com", suppression.MANUAL, "cli")
    work()
    [received] = smtp_server.wait_for(1)
    assert sorted(received.rcpt_tos) == ["ann@example.com", "bob@example.com", "carl@example.com"]
    assert received.message["Cc"] == "bob@example.com"
    record = record_of(redis_client, job.id)
    assert record.status == status.SENT
    assert record.suppressed == {
        "cc-early@example.com": "hard_bounce",
        "cc-late@example.com": "complaint",
        "bcc-late@example.com": "manual",
    }


def test_smtp_550_5_1_1_suppresses_and_550_5_7_1_does_not(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    smtp_server.handler.refuse_rcpt = {
        "gone@example.com": "550 5.1.1 <gone@example.com>: no such user",
        "policy@example.com": "550 5.7.1 relaying denied by policy",
    }
    to = ["ann@example.com", "gone@example.com", "policy@example.com"]
    job = send_email(to, "Hello", "test", address="x")
    work()
    smtp_server.wait_for(1)
    assert record_of(redis_client, job.id).status == status.SENT
    entry = suppression.get(redis_client, "gone@example.com")
    assert entry is not None and (entry.reason, entry.source) == ("hard_bounce", "smtp")
    assert "5.1.1" in entry.detail
    assert suppression.get(redis_client, "policy@example.com") is None
    # The next mail to both: the gone address is left out before the server sees it.
    smtp_server.handler.refuse_rcpt = {}
    smtp_server.handler.reset()
    again = send_email(to, "Again", "test", address="x")
    work()
    [received] = smtp_server.wait_for(1)
    assert sorted(received.rcpt_tos) == ["ann@example.com", "policy@example.com"]
    assert record_of(redis_client, again.id).suppressed == {"gone@example.com": "hard_bounce"}


def test_a_mail_refused_for_its_only_recipient_fails_and_suppresses_it(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    smtp_server.handler.refuse_rcpt = {"gone@example.com": "550 No such user here"}
    job = send_email("gone@example.com", "Hello", "test", address="x")
    work()
    assert record_of(redis_client, job.id).status == status.FAILED
    assert suppression.get(redis_client, "gone@example.com") is not None


def test_api_put_get_list_delete(client: FlaskClient, auth: dict[str, str]) -> None:
    url = "/api/suppressions/Ann@Example.com"
    assert client.get(url, headers=auth).status_code == 404
    made = client.put(url, json={"reason": "manual", "detail": "asked"}, headers=auth)
    assert made.status_code == 201
    assert made.get_json() | {"at": ""} == {
        "address": "ann@example.com", "reason": "manual", "source": "api", "detail": "asked",
        "at": "",
    }  # fmt: skip
    assert client.put(url, json={"reason": "complaint"}, headers=auth).status_code == 200
    assert client.get(url, headers=auth).get_json()["reason"] == "complaint"
    for n in range(4):
        client.put(f"/api/suppressions/u{n}@example.com", json={"reason": "manual"}, headers=auth)
    page = client.get("/api/suppressions?limit=3", headers=auth).get_json()
    assert page["total"] == 5 and len(page["suppressions"]) == 3 and page["next"] == "3"
    rest = client.get("/api/suppressions?limit=3&cursor=3", headers=auth).get_json()
    assert len(rest["suppressions"]) == 2 and rest["next"] is None
    seen = {e["address"] for e in page["suppressions"] + rest["suppressions"]}
    assert len(seen) == 5
    assert client.delete(url, headers=auth).status_code == 204
    assert client.delete(url, headers=auth).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "reason"),
        ({"reason": "bounced"}, "reason"),
        ({"reason": "manual", "detail": 3}, "detail"),
        ({"reason": "manual", "detail": "x" * 501}, "detail"),
        ({"reason": "manual", "source": "smtp"}, "source"),
    ],
)
def test_api_refuses_bad_bodies_naming_the_field(
    client: FlaskClient, auth: dict[str, str], body: dict[str, Any], field: str,
    redis_client: Redis,
) -> None:  # fmt: skip
    response = client.put("/api/suppressions/ann@example.com", json=body, headers=auth)
    assert response.status_code == 400 and response.get_json()["field"] == field
    assert not redis_client.exists(suppression.ENTRIES_KEY)


def test_api_needs_the_token_and_a_real_address(client: FlaskClient, auth: dict[str, str]) -> None:
    assert client.get("/api/suppressions").status_code == 401
    assert (
        client.put("/api/suppressions/x@example.com", json={"reason": "manual"}).status_code == 401
    )
    bad = client.get("/api/suppressions/not-an-address", headers=auth)
    assert bad.status_code == 400 and bad.get_json()["field"] == "email"
    assert client.get("/api/suppressions?limit=0", headers=auth).get_json()["field"] == "limit"


def test_cli_suppress_list_unsuppress(app: Flask, redis_client: Redis) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["mail", "suppress", "Ann@Example.com", "--detail", "typo"])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(args=["mail", "suppressions"])
    assert "ann@example.com  manual  cli" in listed.output and "1 suppressed" in listed.output
    assert runner.invoke(args=["mail", "unsuppress", "ann@example.com"]).exit_code == 0
    assert runner.invoke(args=["mail", "unsuppress", "ann@example.com"]).exit_code == 1
    assert runner.invoke(args=["mail", "suppress", "nonsense"]).exit_code == 2


def test_a_complaint_turns_a_digest_subscriber_off(app_ctx: Flask) -> None:
    digests.upsert_subscriber("ann@example.com", "UTC", "daily")
    deliverability.suppress("ann@example.com", suppression.COMPLAINT, "postmark")
    assert digests.get_subscriber("ann@example.com").schedule.frequency == "off"  # type: ignore[union-attr]


def test_a_hard_bounced_subscriber_is_skipped_while_suppressed(
    app_ctx: Flask, smtp_server: SMTPServer
) -> None:
    now = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    digests.upsert_subscriber("ann@example.com", "UTC", "daily", now=now - timedelta(days=1))
    digests.add_item("ann@example.com", "One")
    deliverability.suppress("ann@example.com", suppression.HARD_BOUNCE, "ses")
    period = "2026-11-27"
    assert send_digests([["ann@example.com", period]]) == {"suppressed": 1}
    assert smtp_server.messages == []
    # The items wait; the subscriber stays daily, for when the address is unsuppressed.
    assert digests.describe_subscriber("ann@example.com")["pending_items"] == 1
    assert digests.get_subscriber("ann@example.com").schedule.frequency == "daily"  # type: ignore[union-attr]
    suppression.remove(get_redis(), "ann@example.com")
