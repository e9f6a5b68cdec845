"""The digest message: its stable mail id, record, subject, headers and the context its
template renders.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime
from typing import Any

from babel.dates import format_date, format_datetime

from app import status
from app.digests.periods import is_weekly_period
from app.digests.subscribers import Subscriber
from app.digests.tokens import unsubscribe_url
from app.digests.validation import DEFAULT_KIND

DIGEST_TEMPLATE = "digest"


def digest_mail_id(email: str, period: str, gen: str) -> str:
    """The same id on every attempt at one subscriber's period (a stable Message-ID, and a
    retry sees `sent`); `gen` makes a deleted and re-created subscriber's differ."""
    return hashlib.sha256(f"digest\n{email}\n{period}\n{gen}".encode()).hexdigest()[:32]


def digest_record(
    subscriber: Subscriber, period: str, count: int, unsubscribe: str | None = None
) -> status.MailRecord:
    """The mail record of one digest. Its context is a summary: the job renders from
    the claimed items, which are kept until the mail is accepted. `unsubscribe`: the
    subscriber's unsubscribe_url, when the caller has it already."""
    frequency = subscriber.schedule.frequency
    return status.MailRecord(
        id=digest_mail_id(subscriber.email, period, subscriber.gen),
        to=[subscriber.email],
        subject=digest_subject(frequency, count, subscriber.locale),
        template=DIGEST_TEMPLATE,
        context={"period": period, "frequency": frequency, "items": count},
        kind="digest",
        headers=digest_headers(subscriber.email, unsubscribe),
        locale=subscriber.locale,
    )


def digest_subject(frequency: str, count: int, locale: str = "") -> str:
    """The subject, in the subscriber's language where the digest template has one
    (email/digest.de.*): it is written into the record at dispatch, before rendering."""
    if locale.partition("_")[0] == "de":
        kind = "tägliche" if frequency == "daily" else "wöchentliche"
        return f"Ihre {kind} Übersicht: {count} neue{'r Eintrag' if count == 1 else ' Einträge'}"
    return f"Your {frequency} digest: {count} new item{'' if count == 1 else 's'}"


def digest_headers(email: str, unsubscribe: str | None = None) -> dict[str, str]:
    """RFC 8058 one-click unsubscribe and RFC 3834 auto-generated marking."""
    return {
        "List-Unsubscribe": f"<{unsubscribe or unsubscribe_url(email)}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "Auto-Submitted": "auto-generated",
    }


def digest_context(
    subscriber: Subscriber,
    period: str,
    items: list[dict[str, Any]],
    unsubscribe: str | None = None,
) -> dict[str, Any]:
    """What email/digest.{txt,html} render: items grouped by kind, newest first; the group
    with the newest item first. `unsubscribe` as for digest_record."""
    zone = subscriber.schedule.zone
    entries = []
    for index, item in enumerate(items):
        at = _parse_time(item.get("at"))
        entries.append(
            {
                "title": item["title"],
                "url": item.get("url") or "",
                "body": item.get("body") or "",
                "kind": item.get("kind") or DEFAULT_KIND,
                "at": at,
                "when": _when(at.astimezone(zone), subscriber.locale) if at else "",
                "order": index,
            }
        )
    entries.sort(key=lambda e: (e["at"] or datetime.min.replace(tzinfo=UTC), e["order"]))
    entries.reverse()
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(entry["kind"], []).append(entry)
    frequency = subscriber.schedule.frequency
    count = len(entries)
    return {
        "email": subscriber.email,
        "frequency": frequency,
        "period": period,
        "period_label": period_label(period),
        # The period's day (a weekly one's Monday) in the subscriber's language, and its
        # ISO week: what a localized template (email/digest.de.*) words itself.
        "period_day": _day(period_date(period), subscriber.locale),
        "week": int(period.split("-W")[1]) if is_weekly_period(period) else None,
        "timezone": subscriber.schedule.timezone,
        "hour": subscriber.schedule.hour,
        "count": count,
        "groups": [
            {
                "kind": kind,
                "label": kind.replace("_", " ").replace("-", " ").capitalize(),
                "entries": group,
            }
            for kind, group in groups.items()
        ],
        "subject": digest_subject(frequency, count, subscriber.locale),
        "unsubscribe_url": unsubscribe or unsubscribe_url(subscriber.email),
    }


def period_date(period: str) -> date:
    """The period's day, or the Monday of its ISO week."""
    if is_weekly_period(period):
        year, week = period.split("-W")
        return date.fromisocalendar(int(year), int(week), 1)
    return date.fromisoformat(period)


def _day(day: date, locale: str) -> str:
    return format_date(day, "full", locale=locale) if locale else day.strftime("%A %d %B %Y")


def _when(moment: datetime, locale: str) -> str:
    """An item's local time: `Tue 15 Jan, 07:41`; `Di. 15. Jan., 07:41` under `de`."""
    if not locale:
        return moment.strftime("%a %d %b, %H:%M")
    pattern = "EEE d. MMM, HH:mm" if locale.partition("_")[0] == "de" else "EEE d MMM, HH:mm"
    return format_datetime(moment, pattern, tzinfo=moment.tzinfo, locale=locale)


def period_label(period: str) -> str:
    if is_weekly_period(period):
        year, week = period.split("-W")
        monday = date.fromisocalendar(int(year), int(week), 1)
        return f"the week of {monday.strftime('%A %d %B %Y')} (week {int(week)})"
    return date.fromisoformat(period).strftime("%A %d %B %Y")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
