"""Transactional delivery: one mail record, rendered and sent by the worker."""

from __future__ import annotations

import logging

from flask import current_app
from redis import Redis
from rq import get_current_job

from app import status
from app.errors import DeliveryError, MailInFlightError
from app.mail import build_message
from app.queues import get_redis
from app.smtp import get_mailer

log = logging.getLogger("mailqueue.jobs.mail")


def deliver(mail_id: str) -> str:
    """Render and send mail `mail_id` unless an earlier attempt already got it accepted.

    Transient failures raise, so RQ retries with backoff; permanent ones fail the
    job at once. The record says which, with the server's reply.
    """
    redis = get_redis()
    config = current_app.config
    outcome, record = status.begin_attempt(redis, mail_id, config["MAIL_JOB_TIMEOUT"] + 30)
    if outcome == "missing":
        log.warning("mail %s: record gone (purged or deleted); nothing to send", mail_id)
        return "missing"
    if outcome == "sent":
        log.info("mail %s: already sent; skipping duplicate job", mail_id)
        return "already sent"
    if outcome == "busy":
        raise MailInFlightError(f"mail {mail_id} is being delivered by another worker")
    assert record is not None
    log.info(
        "mail %s: sending (template %s, attempt %d)", mail_id, record.template, record.attempts
    )
    try:
        message = build_message(record)
        refused = get_mailer().send(message)
    except DeliveryError as err:
        _record_failure(redis, record, err)
        raise
    except Exception as err:
        # A template that cannot render is a bug, not an outage: fail at once.
        _record_failure(redis, record, DeliveryError(f"{type(err).__name__}: {err}"), final=True)
        raise
    status.finish(redis, mail_id, status.SENT, config["MAIL_STATUS_TTL"], refused=refused)
    log.info("mail %s: sent%s", mail_id, f" ({len(refused)} refused)" if refused else "")
    return "sent"


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
        status.update(redis, record.id, status=status.RETRYING, **fields)
        log.warning("mail %s: retry scheduled (%s)", record.id, err)
    else:
        status.finish(
            redis, record.id, status.FAILED, current_app.config["MAIL_STATUS_TTL"], **fields
        )
        log.error("mail %s: failed (%s)", record.id, err)
