"""Validating one mail before anything is enqueued (recipients, subject, template,
context, headers, schedule): `prepare` returns its unsaved record.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import current_app
from jinja2 import TemplateNotFound

from app import status
from app.errors import (
    InvalidContextError,
    InvalidMailError,
    InvalidScheduleError,
    TemplateNotFoundError,
)
from app.mail.addresses import validate_recipients
from app.mail.attachments import validate_attachments
from app.mail.headers import check_header, check_headers
from app.mail.shape import (
    validate_copies,
    validate_idempotency_key,
    validate_locale,
    validate_metadata,
    validate_reply_to,
    validate_tags,
)
from app.queues import DEFAULT_PRIORITY, PRIORITIES

TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}(/[a-z0-9][a-z0-9_-]{0,63}){0,3}$")
MAX_CONTEXT_DEPTH = 20


MAX_SUBJECT_LENGTH = 998  # RFC 5322 line limit


def prepare(
    to: str | Iterable[str],
    subject: str,
    template: str,
    context: Mapping[str, Any],
    *,
    send_at: datetime | None = None,
    delay: timedelta | float | None = None,
    headers: Mapping[str, str] | None = None,
    kind: str = "mail",
    mail_id: str | None = None,
    checks: _Checks | None = None,
    priority: str = DEFAULT_PRIORITY,
    **shape: Any,
) -> status.MailRecord:
    """Validate everything about one mail and return its (unsaved) record. `checks`:
    the settings of a call validating many mails (send_many), read once. `shape`: the
    richer fields (SHAPE_FIELDS: cc, bcc, reply_to, attachments, tags, metadata,
    locale, idempotency_key)."""
    checks = checks or _Checks()
    recipients = validate_recipients(to, checks.max_recipients)
    if shape and not SHAPE_FIELDS.issuperset(shape):  # (a plain mail: no set built)
        unknown = set(shape) - SHAPE_FIELDS
        raise InvalidMailError(sorted(unknown)[0], "is not an argument of send_email")
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidMailError("subject", "must be a non-empty string")
    check_header("subject", subject)
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidMailError("subject", f"longer than {MAX_SUBJECT_LENGTH} characters")
    if not isinstance(template, str) or template not in checks.templates:
        check_template(template)
        checks.templates.add(template)
    context, context_json = validate_context(context, checks.max_context_bytes)
    headers = check_headers(headers)
    when = resolve_send_at(send_at, delay)
    check_priority(priority)
    record = status.MailRecord(
        id=mail_id or status.new_id(),
        to=recipients,
        subject=subject,
        template=template,
        context=context,
        context_json=context_json,
        status=status.SCHEDULED if when else status.QUEUED,
        kind=kind,
        headers=headers,
        send_at=when.isoformat() if when else "",
        priority=priority,
    )
    if shape:
        _add_shape(record, shape, checks)
        if record.idempotency_key:
            record.fingerprint = fingerprint(record, send_at, delay)
    return record


SHAPE_FIELDS = frozenset(
    {"cc", "bcc", "reply_to", "attachments", "tags", "metadata", "locale", "idempotency_key"}
)


def _add_shape(record: status.MailRecord, shape: Mapping[str, Any], checks: _Checks) -> None:
    record.cc, record.bcc = validate_copies(
        record.to, shape.get("cc"), shape.get("bcc"), checks.max_recipients
    )
    record.reply_to = validate_reply_to(shape.get("reply_to"))
    if shape.get("attachments") is not None:
        record.attachments, record.attachment_data = validate_attachments(
            shape["attachments"], checks.max_attachment_bytes
        )
    record.tags = validate_tags(shape.get("tags"))
    record.metadata = validate_metadata(shape.get("metadata"))
    record.locale = validate_locale(shape.get("locale"))
    record.idempotency_key = validate_idempotency_key(shape.get("idempotency_key"))


def fingerprint(
    record: status.MailRecord, send_at: datetime | None, delay: timedelta | float | None
) -> str:
    """A digest of what the caller asked for: the same request twice gives the same one."""
    request = record.to_redis()
    for name in ("id", "status", "created_at", "updated_at", "send_at"):
        request.pop(name)
    request["when"] = send_at.isoformat() if send_at else str(delay or "")
    request["data"] = hashlib.sha256(record.attachment_data).hexdigest()
    return hashlib.sha256(_strict_json(request).encode()).hexdigest()


def check_priority(priority: object) -> None:
    """A mail's lane: one of app.queues.PRIORITIES' names."""
    if not isinstance(priority, str) or priority not in PRIORITIES:
        raise InvalidMailError("priority", "must be one of " + ", ".join(PRIORITIES))


class _Checks:
    """What validating the mails of one call needs, read once: the settings, the
    configured sender and prefix checked, and the templates found so far."""

    def __init__(self) -> None:
        config = current_app.config
        # The configured sender and prefix were checked at start-up; config can be changed
        # afterwards, and a header break there would reach every mail.
        check_header("MAIL_DEFAULT_SENDER", config["MAIL_DEFAULT_SENDER"])
        check_header("MAIL_SUBJECT_PREFIX", config["MAIL_SUBJECT_PREFIX"])
        self.max_recipients: int = config["MAIL_MAX_RECIPIENTS"]
        self.max_context_bytes: int = config["MAIL_MAX_CONTEXT_BYTES"]
        self.max_attachment_bytes: int = config["MAIL_MAX_ATTACHMENT_BYTES"]
        self.templates: set[str] = set()


def check_template(template: Any) -> None:
    """The name is a safe relative name and `email/<name>.txt` exists."""
    if not isinstance(template, str) or not TEMPLATE_NAME.match(template):
        raise TemplateNotFoundError(
            "template",
            f"{template!r} is not a template name (lowercase letters, digits, _ and -, "
            "optionally in subfolders; no '..', no absolute paths)",
        )
    try:
        current_app.jinja_env.get_template(f"email/{template}.txt")
    except TemplateNotFound:
        raise TemplateNotFoundError(
            "template", f"no template email/{template}.txt in {current_app.template_folder}"
        ) from None


RESERVED_CONTEXT_KEYS = frozenset({"template", "template_name_or_list", "locale"})


def validate_context(context: Mapping[str, Any], max_bytes: int) -> tuple[dict[str, Any], str]:
    """A JSON round trip: what the worker renders is exactly what JSON can carry.
    Returns the decoded context and its JSON (what the record stores)."""
    if not isinstance(context, Mapping):
        raise InvalidContextError("context", "must be an object")
    taken = RESERVED_CONTEXT_KEYS.intersection(context)
    if taken:
        # They would collide with render_email's and render_template's own parameters:
        # the mail would be accepted here and fail for good in the worker.
        raise InvalidContextError("context", f"{sorted(taken)[0]!r} is a reserved name")
    _check_depth(context)
    try:
        encoded = _strict_json(context)
    except (TypeError, ValueError) as err:
        raise InvalidContextError("context", f"not JSON-serialisable: {err}") from None
    if len(encoded.encode()) > max_bytes:
        raise InvalidContextError("context", f"larger than {max_bytes} bytes as JSON")
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded, encoded


# json.dumps(context, allow_nan=False, separators=(",", ":")), without building an
# encoder each call.
_strict_json = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def _check_depth(value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_CONTEXT_DEPTH:
            raise InvalidContextError("context", f"nested deeper than {MAX_CONTEXT_DEPTH} levels")
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)


def resolve_send_at(send_at: datetime | None, delay: timedelta | float | None) -> datetime | None:
    """An aware UTC datetime for a deferred mail, or None to send now.

    Naive datetimes are refused: RQ would read them as the server's local time.
    """
    if send_at is not None and delay is not None:
        raise InvalidScheduleError("send_at", "give send_at or delay, not both")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, timedelta | int | float):
            raise InvalidScheduleError("delay", "expected seconds or a timedelta")
        try:
            seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        except OverflowError:  # an int too large for a float
            raise InvalidScheduleError("delay", "must be between 0 and 366 days") from None
        if not 0 <= seconds <= 366 * 86400:
            raise InvalidScheduleError("delay", "must be between 0 and 366 days")
        return datetime.now(UTC) + timedelta(seconds=seconds) if seconds > 0 else None
    if send_at is None:
        return None
    if not isinstance(send_at, datetime):
        raise InvalidScheduleError("send_at", "expected a datetime")
    if send_at.tzinfo is None or send_at.utcoffset() is None:
        raise InvalidScheduleError("send_at", "must be timezone-aware (e.g. 2030-01-01T09:00Z)")
    try:
        when = send_at.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00: before year 1 in UTC
        raise InvalidScheduleError("send_at", "out of range") from None
    if when - datetime.now(UTC) > timedelta(days=366):
        raise InvalidScheduleError("send_at", "more than a year ahead")
    return when if when > datetime.now(UTC) else None
