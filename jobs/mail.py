"""Transactional delivery: one mail record, rendered and sent by the worker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis.exceptions
from flask import current_app
from redis import Redis
from redis.client import Pipeline
from rq import get_current_job
from rq.job import Job
from rq.timeouts import JobTimeoutException

from app import events, status, suppression
from app.errors import (
    DeliveryError,
    MailInFlightError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from app.mail import attachments, build_message
from app.queues import get_redis, replicate
from app.smtp import get_mailer

log = logging.getLogger("mailqueue.jobs.mail")

# After the SMTP server accepted a mail, keep trying this long to record `sent`
# (e.g. across a Redis restart): an unrecorded acceptance is the one way a mail
# can go out twice.
RECORD_SENT_SECONDS = 20.0

T = TypeVar("T")


def deliver(mail_id: str) -> str:
    """Render and send mail `mail_id` unless an earlier attempt already got it accepted.

    Transient failures raise, so RQ retries with backoff; permanent ones fail the
    job at once. The record says which, with the server's reply.
    """
    redis = get_redis()
    config = current_app.config
    job = get_current_job()
    claimed = getattr(job, "claimed_attempt", None)
    if claimed is not None and job is not None and job.args == [mail_id]:
        # The worker claimed this attempt in the round trip that started the job.
        job.claimed_attempt = None  # type: ignore[attr-defined]
        outcome, record = status.attempt_from_reply(claimed)
    else:
        outcome, record = status.begin_attempt(redis, mail_id, lease_seconds(job))
    if outcome == "missing":
        events.emit(events.SKIPPED, mail_id=mail_id, template="", attempt=0, reason="record gone")
        return "missing"
    assert record is not None
    if outcome == "sent":
        _emit(events.SKIPPED, record, reason="already sent")
        return "already sent"
    if outcome == "busy":
        raise MailInFlightError(f"mail {mail_id} is being delivered by another worker")
    if suppression.drop_held(record):
        # Every recipient was suppressed while the mail waited: record it, send nothing.
        return _finish_suppressed(redis, record)
    _emit(events.SENDING, record)
    try:
        if record.attachments:
            _load_attachments(redis, record)
        message = build_message(record)
        refused = get_mailer().send(message)
    except DeliveryError as err:
        if err.refused:
            _suppress_refused(redis, err.refused)
        _record_failure(redis, record, err)
        raise
    except JobTimeoutException as err:
        # Out of time (e.g. a very slow server): worth another try, not a bug.
        _record_failure(redis, record, TransientDeliveryError(f"job timeout: {err}"))
        raise
    except Exception as err:
        # A template that cannot render is a bug, not an outage: fail at once.
        _record_failure(redis, record, DeliveryError(f"{type(err).__name__}: {err}"), final=True)
        raise
    ttl = config["MAIL_STATUS_TTL"]

    more = {"suppressed": record.suppressed} if record.suppressed else {}

    def sent(pipe: Pipeline) -> None:
        replicate(pipe)  # a `sent` a failover loses would send the mail again
        status.queue_finish(
            pipe,
            mail_id,
            status.SENT,
            ttl,
            metric_template=record.template,
            refused=refused,
            **more,
        )
        if refused:  # recipients the server says do not exist: never mail them again
            suppression.queue_smtp_refusals(pipe, refused)

    if getattr(job, "carries_sent", False):
        # A batching worker sends this with its next round trip, at once (app/leanworker.py).
        job.sent_step = sent  # type: ignore[union-attr]
    else:
        write_sent(redis, sent)
    _emit(events.SENT, record, recipients=len(record.to), refused=len(refused) or None)
    return "sent"


def _load_attachments(redis: Redis, record: status.MailRecord) -> None:
    """The attachment bytes stored beside the record at enqueue; gone means it cannot
    be sent as asked (a permanent failure)."""
    data = attachments.load(redis, record)
    if data is None:
        raise PermanentDeliveryError("the attachments are gone from Redis (purged?)")
    record.attachment_data = data


def _finish_suppressed(redis: Redis, record: status.MailRecord) -> str:
    status.finish(
        redis,
        record.id,
        status.SUPPRESSED,
        current_app.config["MAIL_STATUS_TTL"],
        metric_template=record.template,
        suppressed=record.suppressed,
        last_error=record.last_error,
    )
    _emit(events.SKIPPED, record, reason="suppressed")
    return "suppressed"


def _suppress_refused(redis: Redis, refused: dict[str, str]) -> None:
    """Suppress the recipients a failed delivery was refused for as non-existent."""
    with redis.pipeline(transaction=False) as pipe:
        if suppression.queue_smtp_refusals(pipe, refused):
            pipe.execute()


def lease_seconds(job: Job | None) -> int:
    """A delivery's lease: its job's timeout plus the grace RQ's started registry gives it."""
    timeout = (job.timeout if job is not None else None) or current_app.config["MAIL_JOB_TIMEOUT"]
    return int(timeout) + status.LEASE_GRACE_SECONDS


def queue_claim(pipe: Pipeline, job: Job) -> None:
    """Queue `deliver`'s first step, claiming the attempt, on the worker's round trip that
    starts `job` (app/leanworker.py): one round trip fewer per mail. The worker stores
    the reply as `job.claimed_attempt`."""
    status.queue_begin_attempt(pipe, job.args[0], lease_seconds(job))


def _emit(event: str, record: status.MailRecord, **extra: object) -> None:
    job = get_current_job()
    events.emit(
        event,
        mail_id=record.id,
        job_id=job.id if job is not None else None,
        template=record.template,
        attempt=record.attempts,
        **extra,
        **events.labels(record.tags, record.metadata),
    )


def _record_failure(
    redis: Redis, record: status.MailRecord, err: DeliveryError, final: bool = False
) -> None:
    """Keep the reason; `retrying` while RQ has retries left, else `failed`."""
    job = get_current_job()
    retries_left = job.retries_left if job is not None else 0
    if err.permanent or final:
        # Stop RQ from retrying what cannot succeed.
        if job is not None:
            job.retries_left = 0
        retries_left = 0
    fields = {"last_error": str(err), "refused": err.refused}
    if retries_left:
        with redis.pipeline(transaction=False) as pipe:
            status.update(pipe, record.id, status=status.RETRYING, **fields)
            status.count(pipe, "retried", record.template)
            pipe.execute()
        # RQ schedules the retry after this job raises, with this interval.
        _emit(
            events.RETRY_SCHEDULED,
            record,
            retry_in=job.get_retry_interval() if job is not None else None,
            retries_left=retries_left - 1,  # after this one, as RQ counts
            error=type(err).__name__,
            reason=str(err),
        )
    else:
        status.finish(
            redis,
            record.id,
            status.FAILED,
            current_app.config["MAIL_STATUS_TTL"],
            metric_template=record.template,
            **fields,
        )
        _emit(events.FAILED, record, error=type(err).__name__, reason=str(err))


def write_sent(redis: Redis, step: Callable[[Pipeline], None]) -> None:
    """Record an accepted mail as sent in a round trip of its own: `step` queues the
    write on a pipeline (a delivery's, or one a batching worker was handed)."""

    def write() -> None:
        with redis.pipeline(transaction=False) as pipe:
            step(pipe)
            pipe.execute()

    record_sent(write)


def record_sent(write: Callable[[], T]) -> T:
    """Run `write` (the step that records an accepted mail as sent: a delivery's or a
    digest's), retrying Redis connection errors for up to RECORD_SENT_SECONDS."""
    deadline = time.monotonic() + RECORD_SENT_SECONDS
    delay = 0.05
    while True:
        try:
            return write()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("Redis unavailable while recording a sent mail (%s); retrying", err)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
