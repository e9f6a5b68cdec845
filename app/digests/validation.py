"""Validating what the API and CLI pass in: subscriber addresses, schedules, items."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from app.digests.periods import (
    DEFAULT_HOUR,
    DEFAULT_WEEKDAY,
    FREQUENCIES,
    WEEKDAYS,
    Schedule,
    _zone_names,
)
from app.errors import (
    InvalidItemError,
    InvalidMailError,
    InvalidSubscriberError,
)
from app.mail import validate_address
from app.mail.shape import validate_locale

MAX_EMAIL_LENGTH = 254
MAX_TITLE_LENGTH = 200
MAX_URL_LENGTH = 2048
MAX_BODY_LENGTH = 2000
DEFAULT_KIND = "update"
KIND_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def normalize_email(value: Any) -> str:
    """A bare address (no display name), lowercased: the subscriber's identity, so
    `Ann@Example.com` and `ann@example.com` are one subscriber (no mail provider in
    practice treats the local part's case as significant)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidSubscriberError("email", "expected an email address")
    if len(value) > MAX_EMAIL_LENGTH or "<" in value or ">" in value:
        raise InvalidSubscriberError("email", f"{value[:80]!r} is not a bare email address")
    try:
        return validate_address("email", value.strip()).lower()
    except InvalidMailError as err:
        raise InvalidSubscriberError("email", str(err).partition(": ")[2]) from None


def validate_schedule(timezone: Any, frequency: Any, hour: Any, weekday: Any) -> Schedule:
    """A Schedule, or InvalidSubscriberError naming the bad field."""
    if not isinstance(timezone, str) or timezone not in _zone_names():
        raise InvalidSubscriberError(
            "timezone", f"{str(timezone)[:80]!r} is not an IANA time zone (e.g. Europe/Berlin)"
        )
    if frequency not in FREQUENCIES:
        raise InvalidSubscriberError(
            "frequency", f"{str(frequency)[:40]!r} is not one of {', '.join(FREQUENCIES)}"
        )
    if hour is None:
        hour = DEFAULT_HOUR
    if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 23:
        raise InvalidSubscriberError("hour", f"must be an integer from 0 to 23, got {hour!r}")
    if weekday is None:
        weekday = DEFAULT_WEEKDAY
    if not isinstance(weekday, str) or weekday.lower() not in WEEKDAYS:
        raise InvalidSubscriberError(
            "weekday", f"{str(weekday)[:40]!r} is not one of {', '.join(WEEKDAYS)}"
        )
    return Schedule(timezone, frequency, hour, weekday.lower())


def validate_subscriber_locale(locale: Any) -> str:
    """A subscriber's locale, checked as a mail's is ("" for none), refused as a
    subscriber field."""
    try:
        return validate_locale(locale)
    except InvalidMailError as err:
        raise InvalidSubscriberError("locale", str(err).partition(": ")[2]) from None


def validate_item(
    title: Any, url: Any = None, body: Any = None, kind: Any = None
) -> dict[str, str]:
    """One digest item as stored, or InvalidItemError naming the bad field."""
    if not isinstance(title, str) or not title.strip():
        raise InvalidItemError("title", "is required (a non-empty string)")
    title = title.strip()
    if len(title) > MAX_TITLE_LENGTH:
        raise InvalidItemError("title", f"longer than {MAX_TITLE_LENGTH} characters")
    if any(ch in title for ch in "\r\n\0"):
        raise InvalidItemError("title", "must be one line (no CR, LF or NUL)")
    item = {"title": title}
    if url is not None and url != "":
        if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
            raise InvalidItemError(
                "url", f"must be a string of at most {MAX_URL_LENGTH} characters"
            )
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. "http://[abc/x": an unclosed IPv6 bracket
            raise InvalidItemError("url", "must be an absolute http or https URL") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise InvalidItemError("url", "must be an absolute http or https URL")
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
            raise InvalidItemError("url", "must not contain spaces or control characters")
        item["url"] = url
    if body is not None and body != "":
        if not isinstance(body, str) or len(body) > MAX_BODY_LENGTH:
            raise InvalidItemError(
                "body", f"must be a string of at most {MAX_BODY_LENGTH} characters"
            )
        if "\0" in body:
            raise InvalidItemError("body", "must not contain NUL")
        item["body"] = body
    if kind is None or kind == "":
        kind = DEFAULT_KIND
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise InvalidItemError(
            "kind", "must be 1-32 lowercase letters, digits, '-' or '_' (e.g. comment)"
        )
    item["kind"] = kind
    return item
