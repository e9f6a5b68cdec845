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
from app.mail.attachments import Attachment
from app.mail.enqueueing import enqueue
from app.mail.validation import SHAPE_FIELDS, _Checks, check_priority, prepare
from app.queues import DEFAULT_PRIORITY, get_redis


def send_email(
    to: str | Iterable[str],
    subject: str,
    template: str,
    *,
    send_at: datetime | None = None,
    delay: timedelta | float | None = None,
    cc: str | Iterable[str] | None = None,
    bcc: str | Iterable[str] | None = None,
    reply_to: str | Iterable[str] | None = None,
    headers: Mapping[str, str] | None = None,
    attachments: Iterable[Attachment | Mapping[str, Any]] | None = None,
    tags: Iterable[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    locale: str | None = None,
    idempotency_key: str | None = None,
    priority: str = DEFAULT_PRIORITY,
    **context: Any,
) -> Job:
    """Validate a mail and enqueue it on its lane's queue; return its RQ job.

    The job id is the mail id (see app.status). `send_at` must be timezone-aware;
    `delay` is a timedelta or seconds. `cc`/`bcc` count in MAIL_MAX_RECIPIENTS (bcc
    is in no header); `reply_to` is one address or a list; `headers` are extra
    headers; `attachments` are Attachment objects (or mappings of their fields);
    `tags` and `metadata` label the mail in its status and log lines; `locale`
    picks `email/<template>.<locale>.*` and Flask-Babel's locale. Under an
    `idempotency_key` already used for the same request within MAIL_IDEMPOTENCY_TTL,
    nothing is enqueued and the job of the first mail is returned (another request
    under it raises IdempotencyConflictError). `priority` is the lane: "high" (a
    password reset: served before anything else), "normal" (queue `mail`) or "bulk"
    (served only when nothing else waits). Raises an InvalidMailError (a ValueError)
    naming the problem, or QueueUnavailableError when Redis is down; either way
    nothing is enqueued.
    """
    shape: dict[str, Any] = {
        "cc": cc,
        "bcc": bcc,
        "reply_to": reply_to,
        "attachments": attachments,
        "tags": tags,
        "metadata": metadata,
        "locale": locale,
        "idempotency_key": idempotency_key,
    }
    record = prepare(
        to,
        subject,
        template,
        context,
        send_at=send_at,
        delay=delay,
        headers=headers,
        priority=priority,
        **{name: value for name, value in shape.items() if value is not None},
    )
    return enqueue([record])


def send_many(
    messages: Iterable[Mapping[str, Any]], *, priority: str = DEFAULT_PRIORITY
) -> list[str]:
    """Validate and enqueue many mails at once; return their ids, in order.

    Each message is a mapping of send_email's arguments: `to`, `subject`,
    `template`, and optionally `context` (a mapping), `send_at`, `delay`, `cc`,
    `bcc`, `reply_to`, `headers`, `attachments`, `tags`, `metadata`, `locale`,
    `idempotency_key`, `priority` (default: the call's `priority`, itself "normal"
    by default). Every
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
                    headers=message.get("headers"),
                    checks=checks,
                    priority=message.get("priority", priority),
                    **(
                        {}
                        if _PLAIN_KEYS.issuperset(message)  # most bulk mail: skip the lookups
                        else {name: message[name] for name in SHAPE_FIELDS.intersection(message)}
                    ),
                )
            )
        except InvalidMailError as err:
            reason = str(err).removeprefix(f"{err.field}: ")
            raise type(err)(f"messages[{index}].{err.field}", reason) from None
    if records:
        enqueue(records)
    return [record.id for record in records]


_PLAIN_KEYS = frozenset(
    {"to", "subject", "template", "context", "send_at", "delay", "headers", "priority"}
)
_MESSAGE_KEYS = _PLAIN_KEYS | SHAPE_FIELDS


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
    if record.attachments:
        raise MailNotFailedError(
            f"mail {mail_id} had attachments, deleted from Redis when it failed: send it anew"
        )
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
