"""Validating one mail before anything is enqueued (recipients, subject, template,
context, headers, schedule): `prepare` returns its unsaved record.
"""

from __future__ import annotations

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
from app.mail.headers import check_header, check_header_name
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
) -> status.MailRecord:
    """Validate everything about one mail and return its (unsaved) record. `checks`:
    the settings of a call validating many mails (send_many), read once."""
    checks = checks or _Checks()
    recipients = validate_recipients(to, checks.max_recipients)
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidMailError("subject", "must be a non-empty string")
    check_header("subject", subject)
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidMailError("subject", f"longer than {MAX_SUBJECT_LENGTH} characters")
    if not isinstance(template, str) or template not in checks.templates:
        check_template(template)
        checks.templates.add(template)
    context, context_json = validate_context(context, checks.max_context_bytes)
    for name, value in (headers or {}).items():
        check_header_name(name)
        check_header(f"header {name}", value)
    when = resolve_send_at(send_at, delay)
    check_priority(priority)
    return status.MailRecord(
        id=mail_id or status.new_id(),
        to=recipients,
        subject=subject,
        template=template,
        context=context,
        context_json=context_json,
        status=status.SCHEDULED if when else status.QUEUED,
        kind=kind,
        headers=dict(headers or {}),
        send_at=when.isoformat() if when else "",
        priority=priority,
    )


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


RESERVED_CONTEXT_KEYS = frozenset({"template", "template_name_or_list"})


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
