"""The suppression list: addresses mailqueue must not mail, and why.

Every hard bounce and spam complaint that is mailed again counts against the sender's
reputation (providers throttle bounce-heavy senders), so an address that bounced hard
or complained is kept here and left out of every later mail until an operator removes
it. Entries come from SMTP refusals (jobs/mail.py, jobs/digest.py), provider webhooks
(app/webhooks/), the API and the CLI.

Storage: one hash, address -> JSON entry, plus a sorted set by time for listing newest
first. No expiry: a mailbox that did not exist yesterday does not exist today either,
and a complaint is a standing request.

This module sits low (it imports only app.queues' neighbours, not app.mail or
app.digests), because app.mail's enqueue and the delivery job check it; what an entry
does beyond the list itself (a complaint unsubscribing a digest subscriber, an event
on the mail's record) lives in app.deliverability.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any

from redis import Redis
from redis.client import Pipeline

from app import status

ENTRIES_KEY = status.SUPPRESSIONS_KEY  # hash: address -> JSON entry
BY_TIME_KEY = "mq:suppressions:at"  # zset: address -> unix time it was (re)suppressed

HARD_BOUNCE = "hard_bounce"
COMPLAINT = "complaint"
MANUAL = "manual"
REASONS = (HARD_BOUNCE, COMPLAINT, MANUAL)
SOURCES = ("smtp", "ses", "sendgrid", "mailgun", "postmark", "api", "cli")
MAX_DETAIL = 500  # characters of a reply or event kept: enough to read, bounded in Redis


@dataclass(frozen=True)
class Entry:
    """One suppressed address: why (reason), who said so (source), what they said."""

    address: str
    reason: str
    source: str
    detail: str
    at: str

    def public(self) -> dict[str, Any]:
        return asdict(self)


def normalize(address: str) -> str:
    """The bare address, lowercased: what an entry is keyed by. A mail's recipients may
    carry display names (`Ann <ann@example.com>`); a provider reports the bare address,
    in whatever case the recipient typed it."""
    bare = parseaddr(address)[1] or address
    return bare.strip().lower()


def make_entry(address: str, reason: str, source: str, detail: str = "") -> Entry:
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {', '.join(REASONS)}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}")
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    return Entry(normalize(address), reason, source, detail[:MAX_DETAIL], stamp)


def queue_add(pipe: Redis | Pipeline, entry: Entry) -> None:
    """Queue the write of `entry` on `pipe` (replacing any earlier entry for it)."""
    pipe.hset(ENTRIES_KEY, entry.address, json.dumps(entry.public()))
    pipe.zadd(BY_TIME_KEY, {entry.address: datetime.fromisoformat(entry.at).timestamp()})


def add(redis: Redis, entry: Entry) -> None:
    with redis.pipeline(transaction=True) as pipe:
        queue_add(pipe, entry)
        pipe.execute()


def remove(redis: Redis, address: str) -> bool:
    """Forget `address`; False if it was not suppressed."""
    with redis.pipeline(transaction=True) as pipe:
        pipe.hdel(ENTRIES_KEY, normalize(address))
        pipe.zrem(BY_TIME_KEY, normalize(address))
        removed, _ = pipe.execute()
    return bool(removed)


def get(redis: Redis, address: str) -> Entry | None:
    raw: Any = redis.hget(ENTRIES_KEY, normalize(address))
    return _entry(raw) if raw else None


def page(redis: Redis, offset: int, limit: int) -> tuple[list[Entry], int]:
    """Entries newest first, `limit` from `offset`, and how many there are in all."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.zrevrange(BY_TIME_KEY, offset, offset + limit - 1)
        pipe.zcard(BY_TIME_KEY)
        addresses, total = pipe.execute()
    if not addresses:
        return [], int(total)
    raws: Any = redis.hmget(ENTRIES_KEY, addresses)
    return [_entry(raw) for raw in raws if raw], int(total)


def queue_check(pipe: Pipeline, addresses: list[str]) -> None:
    """Queue on `pipe` the lookup of `addresses` (at least one): its reply has, in order,
    each one's entry as stored, or None (read them with `entry_from`)."""
    pipe.hmget(ENTRIES_KEY, [normalize(a) for a in addresses])


def check(redis: Redis, addresses: Iterable[str]) -> dict[str, Entry]:
    """Which of `addresses` (as given, display names and all) are suppressed: one HMGET."""
    given = list(dict.fromkeys(addresses))
    if not given:
        return {}
    raws: Any = redis.hmget(ENTRIES_KEY, [normalize(a) for a in given])
    return {address: _entry(raw) for address, raw in zip(given, raws, strict=True) if raw}


# A record's recipient lists. `cc` and `bcc` arrive with issue 15's message shape; a
# record without them has none, so this holds before and after.
RECIPIENT_FIELDS = ("to", "cc", "bcc")


def recipients(record: status.MailRecord) -> list[str]:
    """Every recipient of `record`, as given (to, then cc, then bcc)."""
    found: list[str] = []
    for name in RECIPIENT_FIELDS:
        found += getattr(record, name, None) or []
    return found


def drop_suppressed(redis: Redis, records: list[status.MailRecord]) -> int:
    """Leave suppressed recipients out of `records` (in place), listing them in each
    record's `suppressed` (address -> reason); a record left with no recipient gets
    status `suppressed` and the reasons as its error. One HMGET for all; how many
    records were suppressed whole. Checked at enqueue and again at delivery: an
    address may be suppressed while its mail waits."""
    found = check(redis, (a for record in records for a in recipients(record)))
    return drop_found(records, found)


def drop_held(record: status.MailRecord) -> bool:
    """`drop_suppressed` for a record being delivered, with what its attempt claim found
    (status.begin_attempt reads the list in the same round trip); True if none is left."""
    if not record.held:
        return False
    found = {address: _entry(raw) for address, raw in record.held.items()}
    return bool(drop_found([record], found))


def drop_found(records: list[status.MailRecord], found: dict[str, Entry]) -> int:
    """`drop_suppressed`'s work once the suppressed recipients are known."""
    if not found:
        return 0
    whole = 0
    for record in records:
        for name in RECIPIENT_FIELDS:
            given = getattr(record, name, None)
            if not given:
                continue
            kept = [address for address in given if address not in found]
            for address in given:
                if address in found:
                    record.suppressed[address] = found[address].reason
            if len(kept) != len(given):
                setattr(record, name, kept)
        if record.suppressed and not recipients(record):
            whole += 1
            record.status = status.SUPPRESSED
            record.last_error = "every recipient is suppressed: " + ", ".join(
                f"{address} ({reason})" for address, reason in record.suppressed.items()
            )
    return whole


def entry_from(raw: bytes | str | None) -> Entry | None:
    return _entry(raw) if raw else None


def _entry(raw: bytes | str) -> Entry:
    data = json.loads(raw)
    return Entry(
        address=data["address"],
        reason=data["reason"],
        source=data["source"],
        detail=data.get("detail", ""),
        at=data.get("at", ""),
    )


# --- what an SMTP refusal says about an address ---------------------------------------------

# RFC 3463 enhanced status codes that say the address itself is bad: 5.1.1 bad destination
# mailbox, 5.1.2 bad destination system (the domain), 5.1.10 null MX (RFC 7505).
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_ADDRESS_GONE = {("5", "1", "1"), ("5", "1", "2"), ("5", "1", "10")}
# What servers that send no enhanced code (or put it in the text only) say for the same:
# Postfix, Exim, Exchange, Gmail, Yahoo, Outlook.com phrasings.
_GONE_TEXT = re.compile(
    r"user unknown|unknown user|no such user|no such recipient|no such mailbox"
    r"|unknown recipient|recipient unknown|mailbox (?:not found|does not exist|unavailable"
    r" or not local)|(?:address|user|mailbox|recipient|account) does not exist"
    r"|does not exist|invalid recipient|recipient not found|no mailbox here"
    r"|unrouteable address|no such domain|domain (?:not found|does not exist)"
    r"|host (?:or domain name )?not found|null mx",
    re.IGNORECASE,
)


def is_hard_bounce(reply: str) -> bool:
    """True for a permanent refusal saying the mailbox or its domain does not exist.

    `reply` is "<code> <text>" as app.smtp keeps it (`550 5.1.1 <ann@x>: no such user`).
    Only 5xx counts. An enhanced code decides when there is one: 5.1.1, 5.1.2 and 5.1.10
    do, anything else (5.7.1 policy, 5.2.2 mailbox full, 5.1.8 bad sender) does not,
    whatever the text says, since a policy refusal often words itself like a missing user.
    Without one, the text decides.
    """
    code = reply.strip()[:3]
    if not (code.isdigit() and code.startswith("5")):
        return False
    enhanced = _ENHANCED.search(reply[3:])
    if enhanced is not None:
        return enhanced.groups() in _ADDRESS_GONE
    return _GONE_TEXT.search(reply) is not None


def smtp_entries(refused: dict[str, str]) -> list[Entry]:
    """The entries a delivery's refused recipients call for (address -> server reply)."""
    return [
        make_entry(address, HARD_BOUNCE, "smtp", reply)
        for address, reply in refused.items()
        if is_hard_bounce(reply)
    ]


def queue_smtp_refusals(pipe: Redis | Pipeline, refused: dict[str, str]) -> int:
    """Queue on `pipe` the suppression of every recipient refused as non-existent; how many."""
    entries = smtp_entries(refused)
    for entry in entries:
        queue_add(pipe, entry)
    return len(entries)
