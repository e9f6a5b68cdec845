"""Failure classification and retry, against the real SMTP server's knobs.

Retry scheduling is tested by moving the clock (time-machine) and running RQ's
scheduler pass (`work(burst=True, with_scheduler=True)`), never by sleeping.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.exceptions
import time_machine
from flask import Flask
from redis import Redis
from rq.job import Job, JobStatus
from rq.timeouts import JobTimeoutException

from app import PROJECT_ROOT, leanworker, status
from app.config import SPEC
from app.errors import PermanentDeliveryError, TransientDeliveryError
from app.mail import retry_policy, send_email
from app.queues import MAIL_QUEUE, get_queue
from app.smtp import classify
from tests.conftest import run_worker as work  # with_scheduler=True: RQ's scheduler pass
from tests.helpers import losing_sent_writes
from tests.servers import SMTPServer


@contextmanager
def later(seconds: float) -> Iterator[None]:
    """Run the block `seconds` from now (the clock keeps ticking from there)."""
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=seconds), tick=True):
        yield


def record(redis_client: Redis, mail_id: str) -> status.MailRecord:
    loaded = status.load(redis_client, mail_id)
    assert loaded is not None
    return loaded


# -- classify -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "permanent", "text"),
    [
        (ConnectionRefusedError(111, "Connection refused"), False, "Connection refused"),
        (TimeoutError("timed out"), False, "timeout"),
        (smtplib.SMTPServerDisconnected("gone"), False, "gone"),
        (smtplib.SMTPDataError(451, b"4.3.0 try later"), False, "451 4.3.0 try later"),
        (smtplib.SMTPSenderRefused(421, b"busy", "a@b.c"), False, "421 busy"),
        (smtplib.SMTPDataError(550, b"5.7.1 rejected"), True, "550 5.7.1 rejected"),
        (smtplib.SMTPAuthenticationError(535, b"bad credentials"), True, "535"),
        (JobTimeoutException("90 s"), False, "job timeout"),
        (redis.exceptions.ConnectionError("down"), False, "rate limiter"),
        (UnicodeEncodeError("ascii", "ä", 0, 1, "no"), True, "UnicodeEncodeError"),
    ],
)
def test_classify(error: Exception, permanent: bool, text: str) -> None:
    result = classify(error)
    assert isinstance(result, PermanentDeliveryError if permanent else TransientDeliveryError)
    assert text in str(result)


def test_classify_recipients_refused_keeps_each_reply() -> None:
    every_5xx = smtplib.SMTPRecipientsRefused(
        {"a@x.com": (550, b"no such user"), "b@x.com": (553, b"bad mailbox")}
    )
    result = classify(every_5xx)
    assert isinstance(result, PermanentDeliveryError)
    assert result.refused == {"a@x.com": "550 no such user", "b@x.com": "553 bad mailbox"}
    some_4xx = smtplib.SMTPRecipientsRefused(
        {"a@x.com": (550, b"no such user"), "b@x.com": (450, b"mailbox busy")}
    )
    assert isinstance(classify(some_4xx), TransientDeliveryError)


# -- defaults ---------------------------------------------------------------------------


def test_default_retry_schedule_rides_out_a_30_minute_outage() -> None:
    parse, default, _aliases = SPEC["MAIL_RETRY_INTERVALS"]
    intervals = parse("MAIL_RETRY_INTERVALS", default)
    # Jitter is +-20%: the worst case is every interval 20% short.
    assert intervals[0] * 1.2 <= 60, "the first retry must come within a minute"
    assert sum(intervals) * 0.8 >= 30 * 60
    for _ in range(200):
        policy = retry_policy(intervals)
        assert policy.max == len(intervals)
        assert all(
            0.8 * s - 1 <= j <= 1.2 * s + 1
            for s, j in zip(intervals, policy.intervals, strict=True)
        )


def test_procfile_worker_runs_the_scheduler_that_moves_retries_back() -> None:
    procfile = (Path(PROJECT_ROOT) / "Procfile").read_text()
    [line] = [line for line in procfile.splitlines() if line.startswith("worker:")]
    assert "--with-scheduler" in line.split()
    assert "app.worker.AppWorker" in line


# -- transient failures are retried with backoff, through RQ's scheduler -------------------


def test_451_is_retried_after_the_interval_only_with_the_scheduler(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    smtp_server.handler.reply = "451 4.3.0 try again later"
    job = send_email("ann@example.com", "Hello", "test")
    work()
    rec = record(redis_client, job.id)
    assert rec.status == status.RETRYING and rec.attempts == 1
    assert "451 4.3.0 try again later" in rec.last_error
    queue = get_queue(MAIL_QUEUE)
    assert job.id in queue.scheduled_job_registry
    when = queue.scheduled_job_registry.get_scheduled_time(job.id)
    assert timedelta(seconds=10) <= when - datetime.now(UTC) <= timedelta(seconds=19)

    smtp_server.handler.reply = None
    with later(60):
        work()  # no scheduler: nothing moves the job back
    assert job.id in queue.scheduled_job_registry
    assert smtp_server.messages == []

    work(with_scheduler=True)  # the scheduler pass, but the retry is not due yet
    assert smtp_server.messages == []
    with later(20):
        work(with_scheduler=True)
    [received] = smtp_server.wait_for(1)
    assert received.message_id == f"<{job.id}@example.com>"
    rec = record(redis_client, job.id)
    assert rec.status == status.SENT and rec.attempts == 2


def test_smtp_server_down_then_up(
    app_ctx: Flask, monkeypatch: pytest.MonkeyPatch, redis_client: Redis
) -> None:
    server = SMTPServer()  # its port is chosen but nothing listens yet
    monkeypatch.setenv("MAIL_PORT", str(server.port))
    job = send_email("ann@example.com", "Hello", "test")
    work()
    rec = record(redis_client, job.id)
    assert rec.status == status.RETRYING
    assert "Connection refused" in rec.last_error
    server.start()
    try:
        with later(20):
            work(with_scheduler=True)
        [received] = server.wait_for(1)
        assert received.message_id == f"<{job.id}@example.com>"
        assert record(redis_client, job.id).status == status.SENT
    finally:
        server.stop()


def test_hanging_server_times_out_and_is_retried(
    app_ctx: Flask, smtp_server: SMTPServer, monkeypatch: pytest.MonkeyPatch, redis_client: Redis
) -> None:
    monkeypatch.setenv("MAIL_TIMEOUT", "0.3")
    smtp_server.handler.hang_seconds = 3
    job = send_email("ann@example.com", "Hello", "test")
    work()
    rec = record(redis_client, job.id)
    assert rec.status == status.RETRYING
    assert "timeout" in rec.last_error.lower() or "timed out" in rec.last_error.lower()
    smtp_server.handler.hang_seconds = 0
    with later(20):
        work(with_scheduler=True)
    smtp_server.wait_for(1)
    # The hung attempt was never accepted: the client left before the server answered.
    assert [m.message_id for m in smtp_server.messages] == [f"<{job.id}@example.com>"]


def test_retries_run_out_and_the_record_says_failed(
    app_ctx: Flask, smtp_server: SMTPServer, monkeypatch: pytest.MonkeyPatch, redis_client: Redis
) -> None:
    monkeypatch.setenv("MAIL_RETRY_INTERVALS", "5,5")
    app_ctx.config["MAIL_RETRY_INTERVALS"] = [5, 5]
    smtp_server.handler.reply = "421 4.7.0 slow down"
    job = send_email("ann@example.com", "Hello", "test")
    work()
    for step in (1, 2):
        with later(10 * step):
            work(with_scheduler=True)
    rec = record(redis_client, job.id)
    assert rec.status == status.FAILED and rec.attempts == 3
    assert "421 4.7.0 slow down" in rec.last_error
    assert job.id in get_queue(MAIL_QUEUE).failed_job_registry
    assert redis_client.zscore(status.FAILED_INDEX, job.id) is not None


# -- permanent failures fail at once -------------------------------------------------------


def test_550_fails_at_once_and_rq_does_not_retry(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    smtp_server.handler.reply = "550 5.7.1 message rejected as spam"
    job = send_email("ann@example.com", "Hello", "test")
    work()
    rec = record(redis_client, job.id)
    assert rec.status == status.FAILED and rec.attempts == 1
    assert rec.last_error == "SMTP server refused: 550 5.7.1 message rejected as spam"
    queue = get_queue(MAIL_QUEUE)
    # RQ honours `job.retries_left = 0` set by the job before it raised.
    assert job.id in queue.failed_job_registry
    assert job.id not in queue.scheduled_job_registry
    stored = Job.fetch(job.id, connection=redis_client, serializer=queue.serializer)
    assert stored.get_status() == JobStatus.FAILED
    smtp_server.handler.reply = None
    with later(7200):
        work(with_scheduler=True)
    assert smtp_server.messages == []
    assert record(redis_client, job.id).attempts == 1


def test_some_recipients_refused_are_recorded(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    smtp_server.handler.refuse_rcpt = {"bob@example.com": "550 5.1.1 no such user"}
    job = send_email(["ann@example.com", "bob@example.com"], "Hello", "test")
    work()
    [received] = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["ann@example.com"]
    rec = record(redis_client, job.id)
    assert rec.status == status.SENT
    assert rec.refused == {"bob@example.com": "550 5.1.1 no such user"}


@pytest.mark.parametrize(
    ("reply", "final"), [("550 5.1.1 no such user", True), ("450 4.2.1 mailbox busy", False)]
)
def test_every_recipient_refused(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, reply: str, final: bool
) -> None:
    smtp_server.handler.refuse_rcpt = {"ann@example.com": reply, "bob@example.com": reply}
    job = send_email(["ann@example.com", "bob@example.com"], "Hello", "test")
    work()
    rec = record(redis_client, job.id)
    assert rec.status == (status.FAILED if final else status.RETRYING)
    assert rec.refused == {"ann@example.com": reply, "bob@example.com": reply}


# -- at-least-once, de-duplicated --------------------------------------------------------


def test_a_requeued_job_skips_a_mail_already_sent(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    job = send_email("ann@example.com", "Hello", "test")
    work()
    smtp_server.wait_for(1)
    queue = get_queue(MAIL_QUEUE)
    for _ in range(2):  # RQ re-queues it (e.g. a cleanup that thought it lost)
        queue.enqueue_call("jobs.mail.deliver", args=(job.id,), job_id=job.id, result_ttl=0)
    work()
    assert len(smtp_server.messages) == 1
    assert record(redis_client, job.id).attempts == 1


def test_a_mail_in_flight_elsewhere_is_not_sent_twice(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    job = send_email("ann@example.com", "Hello", "test")
    outcome, _ = status.begin_attempt(redis_client, job.id, 120)  # another worker's lease
    assert outcome == "go"
    work()
    assert smtp_server.messages == []
    rec = record(redis_client, job.id)
    assert rec.status == status.SENDING and rec.attempts == 1  # the other worker's attempt
    assert job.id in get_queue(MAIL_QUEUE).scheduled_job_registry
    assert status.begin_attempt(redis_client, job.id, 120)[0] == "busy"


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "alone"])
def test_unrecorded_acceptance_is_the_only_duplicate_and_keeps_its_message_id(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    monkeypatch: pytest.MonkeyPatch,
    batched: bool,
) -> None:
    """The worker loses Redis in the instant after the server accepted the mail, whether
    `deliver` records `sent` itself or the batching worker carries the write."""
    import jobs.mail

    if not batched:
        monkeypatch.setattr(leanworker, "BATCH_SIZE", 1)
    monkeypatch.setattr(jobs.mail, "RECORD_SENT_SECONDS", 0.0)
    job = send_email("ann@example.com", "Hello", "test")
    with losing_sent_writes(monkeypatch, times=2) as lost:
        work()
    assert lost and set(lost) == {job.id}
    assert record(redis_client, job.id).status == status.SENDING  # the truth is unknown
    # The job failed through RQ's failure path and waits for its retry.
    assert job.id in get_queue(MAIL_QUEUE).scheduled_job_registry
    # The lost attempt's lease expires (MAIL_JOB_TIMEOUT + 30 s on Redis's clock).
    assert 0 < redis_client.ttl(status.lease_key(job.id)) <= 90 + status.LEASE_GRACE_SECONDS
    redis_client.delete(status.lease_key(job.id))
    with later(20):
        work(with_scheduler=True)
    messages = smtp_server.wait_for(2)
    assert [m.message_id for m in messages] == [f"<{job.id}@example.com>"] * 2
    assert record(redis_client, job.id).status == status.SENT


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "alone"])
def test_sent_is_recorded_across_a_short_redis_outage(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    monkeypatch: pytest.MonkeyPatch,
    batched: bool,
) -> None:
    if not batched:
        monkeypatch.setattr(leanworker, "BATCH_SIZE", 1)
    job = send_email("ann@example.com", "Hello", "test")
    with losing_sent_writes(monkeypatch, times=3) as lost:
        work()
    assert len(lost) == 3
    assert len(smtp_server.messages) == 1
    assert record(redis_client, job.id).status == status.SENT


def test_a_template_that_cannot_render_fails_at_once(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    job = send_email("ann@example.com", "Hello", "test")
    redis_client.hset(status.key(job.id), "template", "no-such-template")
    work()
    rec = record(redis_client, job.id)
    assert rec.status == status.FAILED and "TemplateNotFound" in rec.last_error
    assert job.id not in get_queue(MAIL_QUEUE).scheduled_job_registry


def test_a_retried_mail_keeps_its_attachment_bytes_until_the_retry_sends_it(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    """Transient failure: the bytes stay beside the record for the retry (issue 15);
    they go with the `sent` write."""
    from app.mail import Attachment

    smtp_server.handler.replies = ["451 4.3.0 try again later"]
    job = send_email("ann@example.com", "Hi", "test", attachments=[Attachment("a.pdf", b"%PDF")])
    work()
    assert record(redis_client, job.id).status == status.RETRYING
    assert redis_client.get(status.attachments_key(job.id)) == b"%PDF"
    with later(20):
        work(with_scheduler=True)
    [received] = smtp_server.wait_for(1)
    [part] = list(received.message.iter_attachments())
    assert part.get_payload(decode=True) == b"%PDF"
    assert record(redis_client, job.id).status == status.SENT
    assert redis_client.exists(status.attachments_key(job.id)) == 0
