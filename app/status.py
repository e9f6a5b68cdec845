"""Mail records: the payload and the life of every mail, one Redis hash each.

The record id is the RQ job id, the idempotency key and the Message-ID's
local part. The job carries only that id; the worker reads the payload from
here, so a retried or re-queued job always sees whether the mail was already
accepted by the SMTP server (`sent`) and skips it.

Life: queued | scheduled -> sending -> sent, or -> retrying -> sending ...,
or -> failed. A record lives until MAIL_STATUS_TTL after it ends, whatever
RQ does with its job.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.client import Pipeline

from app.status_scripts import BEGIN_ATTEMPT as _BEGIN_ATTEMPT
from app.status_scripts import FINISH as _FINISH
from app.status_scripts import SETTLE_IF_LIVE as _SETTLE_IF_LIVE
from app.status_scripts import UPDATE_IF_EXISTS as _UPDATE_IF_EXISTS

QUEUED = "queued"
SCHEDULED = "scheduled"
SENDING = "sending"
RETRYING = "retrying"
SENT = "sent"
FAILED = "failed"
# Every recipient was on the suppression list (app/suppression.py): nothing was sent.
SUPPRESSED = "suppressed"
FINAL = frozenset({SENT, FAILED, SUPPRESSED})

# A delivery lease lasts the job's timeout plus this; RQ's started-registry entry of an
# AppWorker job lasts exactly as long (app/worker.py), so a job RQ has not yet called
# abandoned can never be sent by a second worker.
LEASE_GRACE_SECONDS = 30

KEY_PREFIX = "mq:mail:"
# hash: address -> JSON entry; app/suppression.py owns it, the attempt claim reads it.
SUPPRESSIONS_KEY = "mq:suppressions"
FAILED_INDEX = "mq:mails:failed"  # zset: id -> time it failed
# hash: "<outcome>:<template>" -> count, for /metrics (sent, failed, retried), kept in Redis
# so every worker's counts add up; incremented in the same round trip as the state change.
STATS_KEY = "mq:stats"


def new_id() -> str:
    """A fresh mail id (hex, safe in a Redis key and a Message-ID)."""
    return uuid.uuid4().hex


def key(mail_id: str) -> str:
    return KEY_PREFIX + mail_id


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


_compact_json = json.JSONEncoder(separators=(",", ":")).encode


@dataclass
class MailRecord:
    """One mail: what to send and how far it got."""

    id: str
    to: list[str]
    subject: str
    template: str
    context: dict[str, Any]
    status: str = QUEUED
    kind: str = "mail"
    headers: dict[str, str] = field(default_factory=dict)
    send_at: str = ""
    # The lane (app.queues.PRIORITIES): its job's queue, and the one a re-queue uses.
    priority: str = "normal"
    created_at: str = ""
    updated_at: str = ""
    sent_at: str = ""
    attempts: int = 0
    last_error: str = ""
    refused: dict[str, str] = field(default_factory=dict)
    # The message's richer shape (issue 15), stored together as one `extras` JSON field
    # (empty for a plain mail): cc, bcc, reply_to, the attachments' names, types and
    # sizes (their bytes live under attachments_key), tags, metadata, locale.
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    locale: str = ""
    # The attachments' bytes, concatenated in order (sizes in `attachments`): written once
    # beside the record at enqueue, read back by the worker; never in the record hash.
    attachment_data: bytes = field(default=b"", repr=False, compare=False)
    # The caller's idempotency key and a digest of its request (app.mail.idempotency).
    idempotency_key: str = field(default="", repr=False, compare=False)
    fingerprint: str = field(default="", repr=False, compare=False)
    replayed: bool = field(default=False, repr=False, compare=False)  # an earlier mail's id
    # Recipients left out because they are suppressed: address -> reason (app/suppression.py).
    suppressed: dict[str, str] = field(default_factory=dict)
    # At delivery: the recipients the attempt claim found suppressed (address as given ->
    # its entry's JSON), for app.suppression to leave out. Never stored.
    held: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # `context` as JSON, when prepare() encoded it already to check it: written as-is,
    # so a mail's context is encoded once. Empty for records built elsewhere.
    context_json: str = field(default="", repr=False, compare=False)

    def to_redis(self) -> dict[str, str]:
        # Every enqueue writes one of these per mail: no encoder built per call (as
        # json.dumps with options does), and the usual empty dicts written as-is.
        return {
            "id": self.id,
            "to": json.dumps(self.to),
            "subject": self.subject,
            "template": self.template,
            "context": self.context_json or _compact_json(self.context),
            "status": self.status,
            "kind": self.kind,
            "headers": json.dumps(self.headers) if self.headers else "{}",
            "send_at": self.send_at,
            "priority": self.priority,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "sent_at": self.sent_at,
            "attempts": str(self.attempts),
            "last_error": self.last_error,
            "refused": json.dumps(self.refused) if self.refused else "{}",
            "extras": self._extras(),
            "suppressed": json.dumps(self.suppressed) if self.suppressed else "{}",
        }

    def _extras(self) -> str:
        if not (
            self.cc
            or self.bcc
            or self.reply_to
            or self.attachments
            or self.tags
            or self.metadata
            or self.locale
        ):
            return ""  # a plain mail: no dict built (the bulk enqueue writes thousands)
        extras = {name: getattr(self, name) for name in EXTRA_FIELDS if getattr(self, name)}
        return _compact_json(extras) if extras else ""

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> MailRecord:
        data = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            id=data["id"],
            to=json.loads(data.get("to", "[]")),
            subject=data.get("subject", ""),
            template=data.get("template", ""),
            context=json.loads(data.get("context", "{}")),
            status=data.get("status", QUEUED),
            kind=data.get("kind", "mail"),
            headers=json.loads(data.get("headers") or "{}"),
            send_at=data.get("send_at", ""),
            priority=data.get("priority") or "normal",
            created_at=data.get("created_at", ""),
            updated_at=data.get("updated_at", ""),
            sent_at=data.get("sent_at", ""),
            attempts=int(data.get("attempts") or 0),
            last_error=data.get("last_error", ""),
            refused=json.loads(data.get("refused") or "{}"),
            **json.loads(data.get("extras") or "{}"),
            suppressed=json.loads(data.get("suppressed") or "{}"),
        )

    def public(self) -> dict[str, Any]:
        """What the API shows: everything but the template context."""
        view: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "kind": self.kind,
            "to": self.to,
            "subject": self.subject,
            "template": self.template,
            "priority": self.priority,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        for name in ("send_at", "sent_at", "last_error"):
            value = getattr(self, name)
            if value:
                view["error" if name == "last_error" else name] = value
        if self.refused:
            view["refused"] = self.refused
        for name in EXTRA_FIELDS:
            if getattr(self, name):
                view[name] = getattr(self, name)
        if self.suppressed:
            view["suppressed"] = self.suppressed
        return view


EXTRA_FIELDS = ("cc", "bcc", "reply_to", "attachments", "tags", "metadata", "locale")


def create(pipe: Pipeline, record: MailRecord) -> None:
    """Queue the write of a new record on `pipe` (the caller's enqueue transaction)."""
    _stamp_new(record)
    mapping: Any = record.to_redis()
    pipe.hset(key(record.id), mapping=mapping)


def new_record_fields(record: MailRecord, stamp: str) -> dict[str, str]:
    """The hash `create` writes, stamped `stamp`: for app.mail's bulk enqueue, which
    writes many new records in one script and stamps them alike."""
    _stamp_new(record, stamp)
    return record.to_redis()


def reopen(pipe: Pipeline, record: MailRecord) -> None:
    """Queue the rewrite of a failed record as new on `pipe` (an operator's re-queue):
    no expiry, out of the failed index, no stale lease."""
    record.updated_at = now_iso()
    mapping: Any = record.to_redis()
    pipe.hset(key(record.id), mapping=mapping)
    pipe.persist(key(record.id))
    pipe.zrem(FAILED_INDEX, record.id)
    pipe.delete(lease_key(record.id))


def failed_ids(redis: Redis) -> list[str]:
    """Ids in the failed index, oldest failure first."""
    raw: Any = redis.zrange(FAILED_INDEX, 0, -1)
    return [item.decode() for item in raw]


def load_many(redis: Redis, mail_ids: list[str]) -> list[MailRecord | None]:
    """Records for `mail_ids` in one round trip (None where purged or expired)."""
    with redis.pipeline(transaction=False) as pipe:
        for mail_id in mail_ids:
            pipe.hgetall(key(mail_id))
        raws = pipe.execute()
    return [MailRecord.from_redis(raw) if raw else None for raw in raws]


def scan_ids(redis: Redis, batch: int = 500) -> Iterator[list[str]]:
    """Every record id, in batches (SCAN: never blocks Redis)."""
    cursor = 0
    while True:
        reply: Any = redis.scan(cursor, match=KEY_PREFIX + "*", count=batch)
        cursor, keys = reply
        ids = [k.decode()[len(KEY_PREFIX) :] for k in keys if b":" not in k[len(KEY_PREFIX) :]]
        if ids:
            yield ids
        if cursor == 0:
            return


def delete(pipe: Pipeline, mail_id: str) -> None:
    """Queue the removal of a record, its lease and its failed-index entry on `pipe`."""
    pipe.delete(key(mail_id), lease_key(mail_id), attachments_key(mail_id))
    pipe.zrem(FAILED_INDEX, mail_id)


def load(redis: Redis, mail_id: str) -> MailRecord | None:
    raw: Any = redis.hgetall(key(mail_id))
    return MailRecord.from_redis(raw) if raw else None


def begin_attempt(
    redis: Redis,
    mail_id: str,
    lease_seconds: int,
    *,
    create: MailRecord | None = None,
    create_ttl: int | None = None,
) -> tuple[str, MailRecord | None]:
    """Claim one delivery attempt in a single round trip.

    Returns ("missing", None) for a purged record, ("sent", record) when an
    earlier attempt was already accepted, ("busy", record) when another
    worker holds the lease, else ("go", record) with status `sending` and
    attempts incremented. With `create`, a missing record is written first
    (expiring after `create_ttl` seconds until it is finished), so a job that
    builds its record itself (a digest) needs no extra round trip.
    """
    args = _begin_attempt_args(mail_id, lease_seconds, create, create_ttl)
    return attempt_from_reply(redis.eval(_BEGIN_ATTEMPT, 3, *args))


def queue_begin_attempt(
    pipe: Pipeline,
    mail_id: str,
    lease_seconds: int,
    *,
    create: MailRecord | None = None,
    create_ttl: int | None = None,
) -> None:
    """`begin_attempt` on the caller's pipeline (a round trip made anyway: the one in
    which the worker starts the job, or a digest chunk settles the digest before);
    read its reply with `attempt_from_reply`."""
    args = _begin_attempt_args(mail_id, lease_seconds, create, create_ttl)
    pipe.eval(_BEGIN_ATTEMPT, 3, *args)


def attempt_from_reply(reply: Any) -> tuple[str, MailRecord | None]:
    outcome, raw, *held = reply
    if not raw:
        return outcome.decode(), None
    record = MailRecord.from_redis(dict(zip(raw[::2], raw[1::2], strict=True)))
    if held and held[0]:
        flat = held[0]
        record.held = {k.decode(): v.decode() for k, v in zip(flat[::2], flat[1::2], strict=True)}
    return outcome.decode(), record


def _begin_attempt_args(
    mail_id: str, lease_seconds: int, create: MailRecord | None, create_ttl: int | None
) -> list[str]:
    args = [key(mail_id), lease_key(mail_id), SUPPRESSIONS_KEY]
    args += [str(lease_seconds), now_iso(), str(create_ttl or 0)]
    if create is not None:
        _stamp_new(create)
        args.extend(_flatten(create.to_redis()))
    return args


def lease_key(mail_id: str) -> str:
    return key(mail_id) + ":lease"


def attachments_key(mail_id: str) -> str:
    """The string holding a mail's attachment bytes, deleted once it is sent or failed."""
    return key(mail_id) + ":attachments"


def update(redis: Redis | Pipeline, mail_id: str, **fields: Any) -> None:
    """Set some fields of a live record and release its lease (never re-creates a purged one)."""
    mapping = {name: _encode(value) for name, value in fields.items()}
    mapping["updated_at"] = now_iso()
    redis.eval(_UPDATE_IF_EXISTS, 2, key(mail_id), lease_key(mail_id), *_flatten(mapping))


def count(pipe: Redis | Pipeline, outcome: str, template: str) -> None:
    """Count one outcome (sent, failed, retried) of a mail of `template` for /metrics."""
    pipe.hincrby(STATS_KEY, f"{outcome}:{template}", 1)


def finish(
    redis: Redis, mail_id: str, status: str, ttl: int, *, metric_template: str = "", **fields: Any
) -> None:
    """Move a record to a final state, release its lease and start its retention clock.

    With `metric_template`, the outcome is counted for /metrics in the same step.
    One script, so one command (a MULTI/EXEC of five was ~7% of a worker's CPU).
    """
    redis.eval(_FINISH, 5, *_finish_args(mail_id, status, ttl, metric_template, fields))


def queue_finish(
    pipe: Pipeline,
    mail_id: str,
    status: str,
    ttl: int,
    *,
    metric_template: str = "",
    **fields: Any,
) -> None:
    """`finish` on the caller's pipeline, so it can share a MULTI/EXEC with other writes."""
    pipe.eval(_FINISH, 5, *_finish_args(mail_id, status, ttl, metric_template, fields))


def _finish_args(
    mail_id: str, status: str, ttl: int, metric_template: str, fields: dict[str, Any]
) -> list[str]:
    stamp = now_iso()
    mapping = {name: _encode(value) for name, value in fields.items()}
    mapping.update(status=status, updated_at=stamp)
    if status == SENT:
        mapping["sent_at"] = stamp
    failed_at = str(datetime.now(UTC).timestamp()) if status == FAILED else ""
    counter = f"{status}:{metric_template}" if metric_template else ""
    return [
        key(mail_id),
        lease_key(mail_id),
        FAILED_INDEX,
        STATS_KEY,
        attachments_key(mail_id),
        mail_id,
        str(ttl),
        failed_at,
        counter,
        *_flatten(mapping),
    ]


def settle(
    redis: Redis, mail_id: str, new_status: str, reason: str, ttl: int
) -> tuple[str, int] | None:
    """Tell the truth about a mail whose job RQ handled without running our code to the
    end (a killed worker's job, retries exhausted on a Redis error): `retrying` or `failed`
    with `reason`, counted for /metrics in the same step. A record already `sent` or
    `failed` is left alone: None; else the record's (template, attempts), for its event."""
    changed: Any = redis.eval(
        _SETTLE_IF_LIVE,
        5,
        key(mail_id),
        lease_key(mail_id),
        FAILED_INDEX,
        STATS_KEY,
        attachments_key(mail_id),
        new_status,
        reason,
        now_iso(),
        str(ttl),
        str(datetime.now(UTC).timestamp()),
    )
    if not changed:
        return None
    template, attempts = changed
    return template.decode(), int(attempts or 0)


def _stamp_new(record: MailRecord, stamp: str | None = None) -> None:
    """A record about to be written for the first time: created (unless set) and updated
    at `stamp` (now by default)."""
    stamp = stamp or now_iso()
    record.created_at = record.created_at or stamp
    record.updated_at = stamp


def _encode(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _flatten(mapping: dict[str, str]) -> list[str]:
    return [item for pair in mapping.items() for item in pair]
