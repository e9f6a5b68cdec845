"""End to end in one process: send_email -> Redis -> AppWorker -> SMTP, and the mail record."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import time_machine
import trustme
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry
from rq.serializers import JSONSerializer

from app import status
from app.mail import send_email
from app.queues import get_queue
from tests.conftest import API_TOKEN
from tests.helpers import redis_dump, scheduler_pass
from tests.servers import SMTPServer


def record_of(redis: Redis, mail_id: str) -> status.MailRecord:
    record = status.load(redis, mail_id)
    assert record is not None, f"no record for {mail_id}"
    return record


def test_send_email_is_delivered_as_multipart_alternative(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    job = send_email(["Ann <ann@example.com>", "bob@example.com"], "Hello", "test", address="<Ann>")
    assert status.load(redis_client, job.id).status == status.QUEUED  # type: ignore[union-attr]
    work()
    [received] = smtp_server.wait_for(1)
    msg = received.message
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg["Subject"] == "[Example] Hello"
    assert msg["From"].addresses[0].addr_spec == "noreply@example.com"
    assert msg["From"].addresses[0].display_name == "Example App"
    assert received.mail_from == "noreply@example.com"
    assert msg["Message-ID"] == f"<{job.id}@example.com>"
    assert len(msg.get_all("Message-ID")) == 1
    assert sorted(received.rcpt_tos) == ["ann@example.com", "bob@example.com"]
    assert "Hello <Ann>," in received.part("text/plain")
    html = received.part("text/html")
    assert "Hello &lt;Ann&gt;," in html
    assert "<Ann>" not in html
    # A config value and an absolute url_for link, rendered in the worker (no request).
    assert "Sent by https://mail.example.com" in received.part("text/plain")
    assert 'href="https://mail.example.com/healthz"' in html
    assert "https://mail.example.com/healthz" in received.part("text/plain")
    record = record_of(redis_client, job.id)
    assert record.status == status.SENT and record.attempts == 1
    assert record.created_at <= record.updated_at and record.sent_at
    assert 0 < redis_client.ttl(status.key(job.id)) <= 7 * 24 * 3600


def test_no_prefix_means_the_subject_as_given(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], smtp_server: SMTPServer, work: Any
) -> None:
    monkeypatch.setenv("MAIL_SUBJECT_PREFIX", "")
    from app import create_app

    with create_app().app_context():
        send_email("ann@example.com", "Plain", "test", address="Ann")
    work()
    assert smtp_server.wait_for(1)[0].message["Subject"] == "Plain"


def test_status_is_sending_while_the_smtp_server_is_talked_to(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from app.smtp import Mailer

    seen: list[tuple[str, int]] = []
    original = Mailer.send

    def spy(self: Mailer, message: Any) -> dict[str, str]:
        record = record_of(redis_client, message.msgId.strip("<>").split("@")[0])
        seen.append((record.status, record.attempts))
        return original(self, message)

    monkeypatch.setattr(Mailer, "send", spy)
    job = send_email("ann@example.com", "Hello", "test", address="Ann")
    work()
    assert seen == [(status.SENDING, 1)]
    assert record_of(redis_client, job.id).status == status.SENT


def travel_and_work(to: datetime, redis: Redis, work: Any) -> None:
    """Move the clock to `to`, run one pass of RQ's scheduler, then drain the queues."""
    with time_machine.travel(to, tick=True):
        scheduler_pass(redis)
        work()


def test_transient_failure_retries_with_the_same_message_id(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    smtp_server.handler.replies = ["451 4.3.0 try again later"]
    job = send_email("ann@example.com", "Hello", "test", address="Ann")
    work()
    assert smtp_server.messages == []
    [first] = smtp_server.handler.rejected
    record = record_of(redis_client, job.id)
    assert record.status == status.RETRYING
    assert record.attempts == 1
    assert "451" in record.last_error and "try again later" in record.last_error
    # RQ parked the job in its ScheduledJobRegistry until the (jittered) first interval.
    registry = ScheduledJobRegistry("mail", connection=redis_client, serializer=JSONSerializer)
    assert job.id in registry.get_job_ids()
    due = registry.get_scheduled_time(job.id)
    assert timedelta(seconds=11) <= due - datetime.now(UTC) <= timedelta(seconds=19)

    travel_and_work(due + timedelta(seconds=1), redis_client, work)
    [delivered] = smtp_server.wait_for(1)
    assert delivered.message_id == first.message_id == f"<{job.id}@example.com>"
    record = record_of(redis_client, job.id)
    assert record.status == status.SENT and record.attempts == 2
    assert record.last_error  # the history of the failed attempt is kept


def test_permanent_failure_fails_at_once_with_the_reason(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    smtp_server.handler.reply = "550 5.7.1 message refused"
    job = send_email("ann@example.com", "Hello", "test", address="Ann")
    work()
    record = record_of(redis_client, job.id)
    assert record.status == status.FAILED
    assert record.attempts == 1
    assert "550 5.7.1 message refused" in record.last_error
    assert redis_client.zscore(status.FAILED_INDEX, job.id) is not None
    assert 0 < redis_client.ttl(status.key(job.id)) <= 7 * 24 * 3600
    # No retry was scheduled; the job is visible in RQ's failed registry.
    assert ScheduledJobRegistry("mail", connection=redis_client).count == 0
    assert job.id in FailedJobRegistry("mail", connection=redis_client).get_job_ids()


def test_refused_recipient_is_recorded_while_the_others_get_the_mail(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    smtp_server.handler.refuse_rcpt = {"gone@example.com": "550 5.1.1 no such user"}
    job = send_email(["ann@example.com", "gone@example.com"], "Hello", "test", address="x")
    work()
    [received] = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["ann@example.com"]
    record = record_of(redis_client, job.id)
    assert record.status == status.SENT
    assert record.refused == {"gone@example.com": "550 5.1.1 no such user"}


def test_status_ttl_is_configurable_and_independent_of_rq_results(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], work: Any, redis_client: Redis,
    smtp_server: SMTPServer,
) -> None:  # fmt: skip
    monkeypatch.setenv("MAIL_STATUS_TTL", "120")
    from app import create_app

    with create_app().app_context():
        job = send_email("ann@example.com", "Hello", "test", address="Ann")
    assert redis_client.ttl(status.key(job.id)) == -1  # kept while the mail is alive
    work()
    smtp_server.wait_for(1)
    assert 100 < redis_client.ttl(status.key(job.id)) <= 120
    assert not redis_client.exists(job.key)  # RQ dropped the job (result_ttl=0)
    assert record_of(redis_client, job.id).status == status.SENT


def test_an_already_sent_mail_is_not_sent_twice(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    from jobs.mail import deliver

    job = send_email("ann@example.com", "Hello", "test", address="Ann")
    work()
    smtp_server.wait_for(1)
    assert deliver(job.id) == "already sent"
    assert len(smtp_server.messages) == 1
    assert record_of(redis_client, job.id).attempts == 1


@pytest.mark.parametrize(
    "when",
    [
        # Built when the test runs, not at collection: a long suite would skew send_at.
        pytest.param(lambda: {"send_at": datetime.now(UTC) + timedelta(hours=3)}, id="send_at-utc"),
        pytest.param(
            lambda: {"send_at": datetime.now(ZoneInfo("America/New_York")) + timedelta(hours=3)},
            id="send_at-new-york",
        ),
        pytest.param(lambda: {"delay": timedelta(hours=3)}, id="delay-timedelta"),
        pytest.param(lambda: {"delay": 3 * 3600}, id="delay-seconds"),
    ],
)
def test_deferred_mail_waits_in_rq_scheduled_registry_until_due(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    work: Any,
    redis_client: Redis,
    when: Callable[[], dict[str, Any]],
) -> None:
    expected = datetime.now(UTC) + timedelta(hours=3)
    job = send_email("ann@example.com", "Later", "test", address="Ann", **when())
    record = record_of(redis_client, job.id)
    assert record.status == status.SCHEDULED
    assert abs(datetime.fromisoformat(record.send_at) - expected) < timedelta(seconds=5)
    assert datetime.fromisoformat(record.send_at).utcoffset() == timedelta(0)
    assert Job.fetch(job.id, redis_client, JSONSerializer).get_status() == JobStatus.SCHEDULED
    registry = ScheduledJobRegistry("mail", connection=redis_client, serializer=JSONSerializer)
    due = registry.get_scheduled_time(job.id)
    assert abs(due - expected) < timedelta(seconds=5)
    assert get_queue("mail").count == 0

    # Not yet due: a scheduler pass and a worker leave it alone.
    travel_and_work(due - timedelta(minutes=1), redis_client, work)
    assert smtp_server.messages == []
    assert record_of(redis_client, job.id).status == status.SCHEDULED

    travel_and_work(due + timedelta(seconds=1), redis_client, work)
    [received] = smtp_server.wait_for(1)
    assert received.message_id == f"<{job.id}@example.com>"
    assert record_of(redis_client, job.id).status == status.SENT
    assert registry.count == 0


def test_send_at_in_the_past_is_sent_now(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    job = send_email(
        "ann@example.com", "Hi", "test", send_at=datetime.now(UTC) - timedelta(minutes=5)
    )
    assert record_of(redis_client, job.id).status == status.QUEUED
    work()
    assert len(smtp_server.wait_for(1)) == 1


@pytest.fixture
def tls_env(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], smtp_tls_server: SMTPServer,
    tls_ca: trustme.CA, tmp_path: Path,
) -> dict[str, str]:  # fmt: skip
    """A deployment that talks STARTTLS + AUTH to a relay signed by a private CA."""
    smtp_tls_server.handler.reset()
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    values = {
        "MAIL_PORT": str(smtp_tls_server.port),
        "MAIL_USE_TLS": "true",
        "MAIL_USERNAME": "mailer",
        "MAIL_PASSWORD": "s3cret",
        "MAIL_TLS_CA_FILE": str(ca_file),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**env, **values}


def test_starttls_and_auth_delivery(
    tls_env: dict[str, str], smtp_tls_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    from app import create_app

    with create_app().app_context():
        job = send_email("ann@example.com", "Secure", "test", address="Ann")
    work()
    [received] = smtp_tls_server.wait_for(1)
    assert received.tls is True
    assert received.authenticated_as == "mailer"
    assert received.message["Subject"] == "[Example] Secure"
    assert record_of(redis_client, job.id).status == status.SENT


def test_an_untrusted_certificate_is_not_accepted(
    tls_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, smtp_tls_server: SMTPServer,
    work: Any, redis_client: Redis,
) -> None:  # fmt: skip
    monkeypatch.delenv("MAIL_TLS_CA_FILE")  # the system CAs do not know the test CA
    from app import create_app

    with create_app().app_context():
        job = send_email("ann@example.com", "Secure", "test", address="Ann")
    work()
    assert smtp_tls_server.messages == []
    record = record_of(redis_client, job.id)
    assert record.status == status.RETRYING
    assert "CERTIFICATE_VERIFY_FAILED" in record.last_error


def test_no_secret_ever_reaches_redis(
    tls_env: dict[str, str], smtp_tls_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    from app import create_app

    app = create_app({"TESTING": True})
    client: FlaskClient = app.test_client()
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    body = {"to": "ann@example.com", "subject": "Hi", "template": "test", "context": {"a": 1}}
    assert client.post("/api/mail", json=body, headers=headers).status_code == 202
    later = dict(body, delay=600)
    assert client.post("/api/mail", json=later, headers=headers).status_code == 202
    with app.app_context():
        send_email("bob@example.com", "Hi", "test", address="Bob")
    smtp_tls_server.handler.replies = ["451 4.3.0 later"]  # one failure, recorded in Redis
    work()
    work()
    assert len(smtp_tls_server.wait_for(1)) == 1
    dump = redis_dump(redis_client)
    assert b"mq:mail:" in dump  # the dump really holds the records
    for secret in ("s3cret", API_TOKEN, tls_env["SECRET_KEY"]):
        assert secret.encode() not in dump, f"{secret!r} found in Redis"
