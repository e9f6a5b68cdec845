"""The sending API: `send_email`, `send_many`, and `requeue_failed` for operators."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import redis.exceptions
from rq.job import Job

from app import status
from app.errors import (
    InvalidMailError,
    MailNotFailedError,
    QueueUnavailableError,
    UnknownMailError,
)
from app.mail.enqueueing import enqueue
from app.mail.validation import _Checks, check_priority, prepare
from app.queues import DEFAULT_PRIORITY, get_redis


def send_email(
    to: str | Iterable[str],
    subject: str,
    template: str,
    *,
    send_at: datetime | None = None,
    delay: timedelta | float | None = None,
    priority: str = DEFAULT_PRIORITY,
    **context: Any,
) -> Job:
    """Validate a mail and enqueue it on its lane's queue; return its RQ job.

    The job id is the mail id (see app.status). `send_at` must be timezone-aware;
    `delay` is a timedelta or seconds. `priority` is the lane: "high" (a password
    reset: served before anything else), "normal" (queue `mail`) or "bulk" (served
    only when nothing else waits). Raises an InvalidMailError (a ValueError)
    naming the problem, or QueueUnavailableError when Redis is down; either way
    nothing is enqueued.
    """
    record = prepare(
        to, subject, template, context, send_at=send_at, delay=delay, priority=priority
    )
    return enqueue([record])


def send_many(
    messages: Iterable[Mapping[str, Any]], *, priority: str = DEFAULT_PRIORITY
) -> list[str]:
    """Validate and enqueue many mails at once; return their ids, in order.

    Each message is a mapping of send_email's arguments: `to`, `subject`,
    `template`, and optionally `context` (a mapping), `send_at`, `delay`,
    `priority` (default: the call's `priority`, itself "normal" by default). Every
    message is validated first, as send_email does; a refusal raises the same
    InvalidMailError with its field prefixed by the message's index
    (`messages[3].to`). Then all are written in one MULTI/EXEC: all or nothing.
    Much faster per mail than a loop of send_email (one round trip for all).
    """
    check_priority(priority)  # the call's default, named `priority`
    checks = _Checks()
    records = []
    for index, message in enumerate(messages):
        try:
            if not isinstance(message, Mapping):
                raise InvalidMailError("message", "must be a mapping of send_email's arguments")
            if not _MESSAGE_KEYS.issuperset(message):
                unknown = set(message) - _MESSAGE_KEYS
                raise InvalidMailError(sorted(unknown)[0], "is not an argument of send_email")
            for required in ("to", "subject", "template"):
                if required not in message:
                    raise InvalidMailError(required, "is required")
            records.append(
                prepare(
                    message["to"],
                    message["subject"],
                    message["template"],
                    message.get("context", {}),
                    send_at=message.get("send_at"),
                    delay=message.get("delay"),
                    checks=checks,
                    priority=message.get("priority", priority),
                )
            )
        except InvalidMailError as err:
            reason = str(err).removeprefix(f"{err.field}: ")
            raise type(err)(f"messages[{index}].{err.field}", reason) from None
    if records:
        enqueue(records)
    return [record.id for record in records]


_MESSAGE_KEYS = frozenset({"to", "subject", "template", "context", "send_at", "delay", "priority"})


def requeue_failed(mail_id: str) -> status.MailRecord:
    """Queue a failed mail again, now: same id and Message-ID, status `queued`.

    Raises UnknownMailError or MailNotFailedError; QueueUnavailableError if Redis is down.
    """
    try:
        record = status.load(get_redis(), mail_id)
    except redis.exceptions.RedisError as err:
        raise QueueUnavailableError(f"Redis unavailable: {err}") from err
    if record is None:
        raise UnknownMailError(f"no mail {mail_id} (purged or expired?)")
    if record.status != status.FAILED:
        raise MailNotFailedError(f"mail {mail_id} is {record.status}, not failed")
    if record.kind == "digest":
        # It renders from claimed items, not from its record: as a mail job it could
        # only fail again. Its items went back to the subscriber when it failed.
        raise MailNotFailedError(
            f"mail {mail_id} is a digest: its items go out with the subscriber's next digest"
        )
    record.status = status.QUEUED
    record.send_at = ""
    record.last_error = ""
    record.refused = {}
    enqueue([record], reopen=True)  # into its own lane (record.priority)
    return record
