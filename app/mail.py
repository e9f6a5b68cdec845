"""The public mail API: `send_email` validates and enqueues, `render_email` renders.

The web process only validates and enqueues (one pipelined Redis round trip);
the worker renders and delivers (jobs/mail.py). Everything a job needs is
plain JSON in the mail record (app/status.py).
"""

from __future__ import annotations

import binascii
import calendar
import functools
import json
import random
import re
import socket
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.header import Header
from email.utils import formataddr, formatdate, getaddresses, make_msgid, parseaddr
from typing import Any

import css_inline
import email_validator
import flask_mail
import redis.exceptions
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import (
    CASE_INSENSITIVE_MAILBOX_NAMES,
    EMAIL_MAX_LENGTH,
    LOCAL_PART_MAX_LENGTH,
)
from flask import current_app, render_template
from flask_mail import Message, sanitize_address
from jinja2 import TemplateNotFound
from rq import Retry
from rq.job import Job, JobStatus
from rq.queue import Queue

from app import events, status
from app.errors import (
    HeaderInjectionError,
    InvalidAddressError,
    InvalidContextError,
    InvalidMailError,
    InvalidScheduleError,
    MailNotFailedError,
    QueueUnavailableError,
    TemplateNotFoundError,
    UnknownMailError,
)
from app.queues import MAIL_QUEUE, get_queue, get_redis, replicate

DELIVER_JOB = "jobs.mail.deliver"


@functools.cache
def _host_fqdn() -> str:
    return socket.getfqdn()


def _make_msgid(idstring: str | None = None, domain: str | None = None) -> str:
    """email.utils.make_msgid with the host name resolved once per process. Flask-Mail's
    Message() makes a Message-ID we replace anyway (message_id below), and make_msgid's
    own socket.getfqdn() is a reverse DNS lookup on every mail: ~37 µs here, a stalled
    worker where DNS is slow."""
    return make_msgid(idstring, domain or _host_fqdn())


flask_mail.make_msgid = _make_msgid
TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}(/[a-z0-9][a-z0-9_-]{0,63}){0,3}$")
MAX_CONTEXT_DEPTH = 20
# A plain `local@domain` address: what it means needs no RFC 5322 parse (app/smtp.py too).
BARE_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")
MAX_SUBJECT_LENGTH = 998  # RFC 5322 line limit
HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")
RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "subject", "message-id", "date", "sender", "mime-version"}
    | {"content-type", "content-transfer-encoding", "return-path"}
)
# C0 and C1 controls except TAB, DEL, and the Unicode line and paragraph separators.
_HEADER_BREAKERS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass
class RenderedEmail:
    text: str
    html: str | None


def render_email(template: str, **context: Any) -> RenderedEmail:
    """Render `email/<template>.txt` and, if present, `.html` (the one template helper).

    The html comes out with its `<style>` rules inlined (see `inline_css`), so
    transactional mail, digests and previews all look alike in every client.
    Needs an app context, not a request: links come out absolute from PUBLIC_URL.
    """
    text = render_template(f"email/{template}.txt", **context)
    try:
        html: str | None = render_template(f"email/{template}.html", **context)
    except TemplateNotFound:
        html = None
    return RenderedEmail(text=text, html=inline_css(html) if html is not None else None)


def inline_css(html: str) -> str:
    """Move `<style>` rules into `style=""` attributes: many mail clients (Gmail's
    apps, Outlook) drop or ignore `<style>` blocks. @media and other at-rules stay
    in a `<style>` block for the clients that honour them. `<link>` stylesheets are
    dropped, never fetched: rendering must not depend on (or leak to) the network."""
    return _inliner().inline(html)


@functools.cache
def _inliner() -> css_inline.CSSInliner:
    # Built once per process: it holds the (immutable) options only, and is thread-safe.
    return css_inline.CSSInliner(
        load_remote_stylesheets=False,
        keep_link_tags=False,
        keep_style_tags=False,
        keep_at_rules=True,
    )


# Headers whose value is a list of <URL>s (RFC 2369, RFC 8058). The email package
# folds a line over 78 characters that has no space to break at into RFC 2047
# encoded-words, which mail clients do not decode there; these are written as they
# are instead (lines up to RFC 5322's hard limit of 998 characters are valid).
VERBATIM_HEADERS = ("List-Unsubscribe",)
MAX_HEADER_LINE = 998


class _Verbatim(str):
    """A header value the generator writes unchanged (see VERBATIM_HEADERS)."""

    name: str

    def __new__(cls, name: str, value: str) -> _Verbatim:
        obj = super().__new__(cls, value)
        obj.name = name
        return obj

    def fold(self, *, policy: Any) -> str:
        return f"{self.name}: {self}{policy.linesep}"


class MailMessage(Message):
    """Flask-Mail's Message, but text + html without attachments is a top-level
    multipart/alternative (Flask-Mail wraps it in a needless multipart/mixed),
    URL-list headers are not mangled by folding, and that common shape is
    serialised directly.

    Flask-Mail flattens an email.message tree under the `SMTP` policy, which
    re-parses every header through the header registry: about 1 ms a mail, most of
    a worker's CPU (see README, Performance). `as_bytes` writes the same MIME
    structure in a few tens of microseconds; any other shape (attachments, cc,
    reply-to, other alternatives or charsets) keeps Flask-Mail's own path.
    """

    def as_bytes(self) -> bytes:
        if (
            self.attachments
            or self.cc
            or self.reply_to
            or set(self.alts) - {"html"}
            or (self.charset or "utf-8").lower() != "utf-8"
        ):
            return super().as_bytes()
        return _compose(self)

    def _message(self) -> Any:
        message: Any = super()._message()
        parts = message.get_payload()
        if (
            message.get_content_type() == "multipart/mixed"
            and len(parts) == 1
            and parts[0].get_content_type() == "multipart/alternative"
        ):
            inner: Any = parts[0]
            for name, value in message.items():
                if name.lower() not in ("content-type", "mime-version"):
                    inner[name] = value
            inner.policy = message.policy
            message = inner
        for name in VERBATIM_HEADERS:
            value = message.get(name)
            text = str(value) if value is not None else ""
            if (
                text
                and text.isascii()
                and not any(ch in text for ch in "\r\n")
                and len(name) + 2 + len(text) <= MAX_HEADER_LINE
            ):
                message.replace_header(name, _Verbatim(name, text))
        return message


_CRLF = "\r\n"
_MAX_LINE = 998  # RFC 5322: at most 998 characters a line, CRLF excluded
_FOLD_AT = 78  # RFC 5322: lines SHOULD stay within 78 characters


def _compose(message: Message) -> bytes:
    """The wire bytes of a text (+ html) message: the headers Flask-Mail writes,
    parts in 7bit when they are ASCII with short lines, else quoted-printable (no
    reliance on the server's 8BITMIME). Header values were checked for CR/LF when
    the mail was queued, and are again here (as Flask-Mail's BadHeaderError would);
    non-ASCII ones are RFC 2047-encoded."""
    html = message.html
    text_encoding, text = _encode(message.body or "")
    if html is None:
        lines = ['Content-Type: text/plain; charset="utf-8"', "MIME-Version: 1.0"]
        lines.append(f"Content-Transfer-Encoding: {text_encoding}")
        body = text
    else:
        # "=_" never occurs in quoted-printable; a 7bit part would have to contain
        # these 128 random bits verbatim.
        boundary = ("=_" + uuid.uuid4().hex).encode()
        html_encoding, html_data = _encode(html)
        body = b"".join(
            (
                b"--" + boundary + b"\r\n" + _part_head("plain", text_encoding) + text,
                b"\r\n--" + boundary + b"\r\n" + _part_head("html", html_encoding) + html_data,
                b"\r\n--" + boundary + b"--\r\n",
            )
        )
        lines = [f'Content-Type: multipart/alternative; boundary="{boundary.decode()}"']
        lines.append("MIME-Version: 1.0")
    if message.subject:
        lines.append(_header("Subject", message.subject))
    lines.append(f"From: {_address(_text(message.sender))}")
    recipients = [_address(_text(to)) for to in dict.fromkeys(message.recipients)]
    joined = ", ".join(recipients)
    lines.append("To: " + (joined if len(joined) < _FOLD_AT - 4 else ",\r\n ".join(recipients)))
    lines.append(f"Date: {formatdate(message.date, localtime=True)}")
    lines.append(f"Message-ID: {message.msgId}")
    for name, value in (message.extra_headers or {}).items():
        lines.append(_header(name, value))
    return (_CRLF.join(lines) + _CRLF + _CRLF).encode("ascii") + body


def _encode(text: str) -> tuple[str, bytes]:
    """A text part's transfer encoding and bytes (CRLF line ends)."""
    data = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n").encode()
    if data.isascii() and (len(data) <= _MAX_LINE or _longest_line(data) <= _MAX_LINE):
        return "7bit", data
    # b2a_qp breaks soft lines with LF unless the text's first line ends in CRLF.
    encoded = binascii.b2a_qp(data, istext=True).replace(b"\r\n", b"\n")
    return "quoted-printable", encoded.replace(b"\n", b"\r\n")


def _part_head(subtype: str, encoding: str) -> bytes:
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode()


def _longest_line(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\r\n"))


def _header(name: str, value: str) -> str:
    """`Name: value`, RFC 2047-encoded if not ASCII. An ASCII value stays on one line
    up to the 998-character limit (folding a token such as a URL would only add
    whitespace to it); beyond that it is folded at its spaces."""
    check_header(name, value)
    if value.isascii() and len(name) + 2 + len(value) <= _MAX_LINE:
        return f"{name}: {value}"
    charset = "us-ascii" if value.isascii() else "utf-8"
    encoded = Header(value, charset, header_name=name).encode(linesep=_CRLF)
    return f"{name}: {encoded}"


@functools.lru_cache(maxsize=1024)
def _address(value: str) -> str:
    """An address header item: a bare address as is, an ASCII display name quoted as
    needed, a non-ASCII one RFC 2047-encoded (Flask-Mail's sanitize_address, which
    would encode ASCII names too). Cached: the sender repeats."""
    check_header("address", value)
    if value.isascii():
        if "<" not in value and " " not in value:
            return value
        name, addr = parseaddr(value)
        if addr:
            return formataddr((name, addr))
    return sanitize_address(value)


def _text(value: str | tuple[str, str]) -> str:
    return value if isinstance(value, str) else formataddr(value)


def build_message(record: status.MailRecord, context: Mapping[str, Any] | None = None) -> Message:
    """The Flask-Mail Message for a record: prefix, sender, stable Message-ID, both parts.

    `context` replaces the record's own (a digest renders from its claimed items,
    which are not copied into the record).
    """
    config = current_app.config
    rendered = render_email(record.template, **(record.context if context is None else context))
    prefix = config["MAIL_SUBJECT_PREFIX"]
    message = MailMessage(
        subject=f"{prefix} {record.subject}" if prefix else record.subject,
        recipients=list(record.to),
        body=rendered.text,
        html=rendered.html,
        sender=config["MAIL_DEFAULT_SENDER"],
        extra_headers=dict(record.headers) or None,
    )
    message.msgId = message_id(record.id, config["MAIL_DEFAULT_SENDER"])
    return message


def message_id(mail_id: str, sender: str) -> str:
    """`<id@sender-domain>`: the same on every attempt, so duplicates are recognisable."""
    return f"<{mail_id}@{_sender_domain(sender)}>"


@functools.lru_cache(maxsize=64)
def _sender_domain(sender: str) -> str:
    # Parsed once per sender, not once per mail (the sender is the configured one).
    return parseaddr(sender)[1].rpartition("@")[2] or "mailqueue.invalid"


def send_email(
    to: str | Iterable[str],
    subject: str,
    template: str,
    *,
    send_at: datetime | None = None,
    delay: timedelta | float | None = None,
    **context: Any,
) -> Job:
    """Validate a mail and enqueue it on the `mail` queue; return its RQ job.

    The job id is the mail id (see app.status). `send_at` must be timezone-aware;
    `delay` is a timedelta or seconds. Raises an InvalidMailError (a ValueError)
    naming the problem, or QueueUnavailableError when Redis is down; either way
    nothing is enqueued.
    """
    record = prepare(to, subject, template, context, send_at=send_at, delay=delay)
    return enqueue([record])


def send_many(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """Validate and enqueue many mails at once; return their ids, in order.

    Each message is a mapping of send_email's arguments: `to`, `subject`,
    `template`, and optionally `context` (a mapping), `send_at`, `delay`. Every
    message is validated first, as send_email does; a refusal raises the same
    InvalidMailError with its field prefixed by the message's index
    (`messages[3].to`). Then all are written in one MULTI/EXEC: all or nothing.
    Much faster per mail than a loop of send_email (one round trip for all).
    """
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
                )
            )
        except InvalidMailError as err:
            reason = str(err).removeprefix(f"{err.field}: ")
            raise type(err)(f"messages[{index}].{err.field}", reason) from None
    if records:
        enqueue(records)
    return [record.id for record in records]


_MESSAGE_KEYS = frozenset({"to", "subject", "template", "context", "send_at", "delay"})


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
    )


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


def enqueue(records: list[status.MailRecord], *, reopen: bool = False) -> Job:
    """Write records and their jobs in one MULTI/EXEC round trip: all or nothing.

    Returns the first record's RQ job (what send_email returns). `reopen`: the
    records are failed ones an operator re-queues (same id, so the same
    Message-ID); their old jobs leave RQ's failed registry in the same step.
    """
    queue = get_queue(MAIL_QUEUE)
    jobs = _DeliverJobs(queue, current_app.config)
    # New mails to queue now, if more than one: written by a script (_write_queued). One
    # alone costs Redis less as the plain HSETs below.
    bulk = [] if reopen else [record for record in records if not record.send_at]
    bulk = bulk if len(bulk) > 1 else []
    first: Job | None = None
    ready: list[str] = []  # ids to push on the queue, in order
    try:
        with get_redis().pipeline(transaction=True) as pipe:
            pipe.multi()  # explicit, so RQ's writes add to this transaction as-is
            replicate(pipe)  # accepted = on REDIS_MIN_REPLICAS replicas too
            for record in records:
                if bulk and not record.send_at:
                    ready.append(record.id)
                    continue
                if reopen:
                    status.reopen(pipe, record)
                    pipe.zrem(queue.failed_job_registry.key, record.id)
                else:
                    status.create(pipe, record)
                if record.send_at:
                    job = jobs.create(record, JobStatus.SCHEDULED)
                    schedule(queue, job, datetime.fromisoformat(record.send_at), pipe)
                else:
                    job = jobs.create(record, JobStatus.QUEUED)
                    # What Queue.enqueue_job writes for a job without dependencies, minus
                    # its per-job SADD, status HSET and RPUSH (one RPUSH below).
                    queue._prepare_for_queue(job)
                    pipe.hset(job.key, mapping=job.to_dict())
                    ready.append(job.id)
                first = first or job
            if bulk:
                job = _write_queued(pipe, jobs, bulk)
                first = job if bulk[0] is records[0] else first
            if ready:
                pipe.sadd(queue.redis_queues_keys, queue.key)
                pipe.rpush(queue.key, *ready)
            pipe.execute()
    except redis.exceptions.RedisError as err:
        raise QueueUnavailableError(f"Redis unavailable, mail not queued: {err}") from err
    for record in records:
        events.emit(
            record.status,  # queued or scheduled
            mail_id=record.id,
            template=record.template,
            attempt=0,
            kind=record.kind,
            recipients=len(record.to),
            send_at=record.send_at,
        )
    assert first is not None
    return first


class _DeliverJobs:
    """The RQ jobs of mail records: DELIVER_JOB with the mail id as its only argument,
    the configured timeout, failure TTL and (jittered) retries, no result kept."""

    # The fields in which two queued jobs of one enqueue differ (see _write_queued).
    VARYING = ("data", "retry_intervals", "description")

    def __init__(self, queue: Queue, config: Mapping[str, Any]) -> None:
        self.queue = queue
        self.timeout: int = config["MAIL_JOB_TIMEOUT"]
        self.failure_ttl: int = config["MAIL_STATUS_TTL"]
        self.intervals: list[int] = config["MAIL_RETRY_INTERVALS"]
        # Two mails' job data differ only in the id: the JSON serializer's bytes for a
        # placeholder id, split around it, joined with each mail's (hex) id in varying().
        data = queue.serializer.dumps((DELIVER_JOB, None, (_ID_MARK,), {}))
        self.data_head, _, self.data_tail = data.partition(_ID_MARK.encode())

    def create(self, record: status.MailRecord, job_status: JobStatus) -> Job:
        """RQ's own Job for `record`."""
        return self.queue.create_job(
            DELIVER_JOB,
            args=(record.id,),
            job_id=record.id,
            timeout=self.timeout,
            result_ttl=0,
            failure_ttl=self.failure_ttl,
            retry=retry_policy(self.intervals),
            description=self.description(record),
            status=job_status,
        )

    def description(self, record: status.MailRecord) -> str:
        return f"mail {record.template}"

    def varying(self, record: status.MailRecord) -> tuple[bytes, str, str]:
        """The VARYING fields of `record`'s queued job, as Job.to_dict writes them."""
        # Job.data: the serialized (function name, instance, args, kwargs).
        if record.id.isascii() and record.id.isalnum():
            data = self.data_head + record.id.encode() + self.data_tail
        else:  # an id the serializer might escape
            data = self.queue.serializer.dumps((DELIVER_JOB, None, (record.id,), {}))
        return _zlib_stored(data), json.dumps(jittered(self.intervals)), self.description(record)


_ID_MARK = "MAILQUEUEID"


def _write_queued(pipe: Any, jobs: _DeliverJobs, records: list[status.MailRecord]) -> Job:
    """Queue on `pipe` the writes of new records and their jobs, as status.create
    and the plain path in `enqueue` write them, in one script per _BULK_CHUNK mails
    (the caller pushes the ids); return the first record's Job.

    Building an RQ Job per mail, and two HSETs through redis-py (which encodes every
    argument and reads a QUEUED reply per command), were most of a bulk enqueue's
    time. Here RQ builds the first job; every other job hash is that one with its
    VARYING fields replaced, and field names go once per script, not once per mail.
    """
    first = jobs.create(records[0], JobStatus.QUEUED)
    jobs.queue._prepare_for_queue(first)
    fixed = first.to_dict()
    own = tuple(fixed.pop(name) for name in _DeliverJobs.VARYING)
    fixed_items = [item for pair in fixed.items() for item in pair]
    stamp = status.now_iso()
    record_names: list[str] = []
    for start in range(0, len(records), _BULK_CHUNK):
        keys: list[str] = []
        values: list[Any] = []
        for record in records[start : start + _BULK_CHUNK]:
            fields = status.new_record_fields(record, stamp)
            record_names = record_names or list(fields)  # to_redis's, same for all
            keys += (status.key(record.id), jobs.queue.job_class.key_for(record.id))
            values += fields.values()
            values += own if record is records[0] else jobs.varying(record)
        head = [len(record_names), *record_names, len(fixed_items), *fixed_items]
        head += [len(_DeliverJobs.VARYING), *_DeliverJobs.VARYING]
        pipe.eval(_WRITE_NEW_MAILS, len(keys), *keys, *head, *values)
    return first


_BULK_CHUNK = 500  # mails per script: ~10,000 arguments

# KEYS: each mail's record key, then its job key. ARGV: the record's field names, the
# job's fixed field/value pairs and its varying field names, each list after its length;
# then for each mail its record's values and its job's varying values.
_WRITE_NEW_MAILS = """
local at = 1
local function list()
  local n = tonumber(ARGV[at])
  local items = {unpack(ARGV, at + 1, at + n)}
  at = at + n + 1
  return items
end
local record_names, job, job_names = list(), list(), list()
local fixed, record = #job, {}
for k = 1, #KEYS, 2 do
  for i, name in ipairs(record_names) do
    record[2 * i - 1] = name
    record[2 * i] = ARGV[at]
    at = at + 1
  end
  for i, name in ipairs(job_names) do
    job[fixed + 2 * i - 1] = name
    job[fixed + 2 * i] = ARGV[at]
    at = at + 1
  end
  redis.call('HSET', KEYS[k], unpack(record))
  redis.call('HSET', KEYS[k + 1], unpack(job))
end
return #KEYS / 2
"""


def _zlib_stored(data: bytes) -> bytes:
    """A zlib stream of one stored (uncompressed) block, as `zlib.compress(data, 0)`
    writes it: RQ reads job data with zlib.decompress. Compressing a ~100-byte payload
    saves nothing, and zlib.compress sets up a deflate state of ~256 KB each call:
    tens of microseconds a job."""
    size = len(data)
    if size > 0xFFFF:  # more than one block holds
        return zlib.compress(data)
    return (
        b"\x78\x01\x01"
        + size.to_bytes(2, "little")
        + (size ^ 0xFFFF).to_bytes(2, "little")
        + data
        + zlib.adler32(data).to_bytes(4, "big")
    )


def schedule(queue: Queue, job: Job, when: datetime, pipe: Any) -> None:
    """`Queue.schedule_job`, but every write inside `pipe`.

    rq 2.12's ScheduledJobRegistry.schedule() ignores its pipeline and ZADDs at
    once: outside our transaction, before the job hash exists (a scheduler pass
    in between drops the id, losing the mail) and even when the transaction
    then fails. Same keys and score (whole UTC seconds) as RQ writes.
    """
    pipe.sadd(queue.redis_queues_keys, queue.key)
    queue._persist_job(job, pipe, status=JobStatus.SCHEDULED)
    score = calendar.timegm(when.astimezone(UTC).utctimetuple())
    pipe.zadd(queue.scheduled_job_registry.key, {job.id: score})


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
    enqueue([record], reopen=True)
    return record


def retry_policy(intervals: list[int]) -> Retry:
    """RQ retries at the configured intervals, each jittered by +-20% so a fleet of
    mails that failed together does not hammer the provider together."""
    return Retry(max=len(intervals), interval=jittered(intervals))


def jittered(intervals: list[int]) -> list[int]:
    """Each interval times a uniform 0.8-1.2 (random.uniform's own formula, inlined:
    a bulk enqueue draws one per interval per mail)."""
    draw = random.random
    return [max(1, round(seconds * (0.8 + 0.4 * draw()))) for seconds in intervals]


def validate_recipients(to: str | Iterable[str], limit: int) -> list[str]:
    """Normalise `to` to a list of `addr` or `Name <addr>` strings, each checked."""
    if isinstance(to, str):
        items = [to]
    elif isinstance(to, Iterable) and not isinstance(to, bytes | Mapping):
        items = list(to)
    else:
        raise InvalidAddressError("to", "expected an address or a list of addresses")
    if not items:
        raise InvalidAddressError("to", "at least one recipient is required")
    if len(items) > limit:
        raise InvalidAddressError("to", f"at most {limit} recipients per mail")
    return [validate_address("to", item) for item in items]


def validate_address(field: str, value: Any) -> str:
    """One address, optionally with a display name (any script); the address itself
    ASCII only, internationalised domains included: no SMTPUTF8."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidAddressError(field, f"expected an email address, got {value!r}")
    check_header(field, value)
    # A bare address (the common case) is one address and needs no RFC 5322 parse:
    # parseaddr would return it unchanged, and it costs a third of a bulk enqueue's
    # validation.
    if BARE_ADDRESS.fullmatch(value):
        name, addr = "", value
    else:
        if len(getaddresses([value])) != 1:
            raise InvalidAddressError(field, f"{value!r}: one address per item, please")
        name, addr = parseaddr(value)
    if not addr or ("<" in value and not value.rstrip().endswith(">")):
        raise InvalidAddressError(field, f"{value!r} is not an email address")
    if not addr.isascii():
        # email-validator accepts an internationalised domain (as IDNA) even without
        # SMTPUTF8 but returns it in Unicode, which smtplib cannot send: refuse here.
        raise InvalidAddressError(
            field, f"{addr!r}: non-ASCII addresses are not supported (no SMTPUTF8)"
        )
    normalized = plain_address(addr)
    if normalized is None:
        try:
            result = validate_email(addr, check_deliverability=False, allow_smtputf8=False)
        except EmailNotValidError as err:
            raise InvalidAddressError(field, f"{addr!r}: {err}") from None
        # `normalized` gives an IDNA domain in Unicode (xn--bcher-kva.example ->
        # bücher.example), which smtplib cannot send without SMTPUTF8: keep it ASCII.
        normalized = result.ascii_email or result.normalized
    return formataddr((name, normalized)) if name else normalized


# A plain address: a dot-atom local part, and a domain of letter-digit-hyphen labels of at
# most 63 characters, with at least one dot, whose last label ends in a letter.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"(?:[A-Za-z0-9][A-Za-z0-9-]{0,61})?[A-Za-z]"
)


def plain_address(addr: str) -> str | None:
    """`addr` normalised exactly as validate_address's email-validator call would,
    if it is a plain address that call certainly accepts; else None (ask it).

    email-validator takes tens of microseconds an address, a third of a bulk
    enqueue's validation; for a plain address its answer is the address with the
    domain lowercased (and an RFC 2142 mailbox name such as Postmaster). Conservative:
    local parts over 64 characters, "--" in the domain (Punycode, reserved forms) and
    special-use domains go to email-validator (its module settings are honoured).
    tests/test_plain_address.py checks the two agree.
    """
    if len(addr) > EMAIL_MAX_LENGTH or not _PLAIN_ADDRESS.fullmatch(addr):
        return None
    local, _, domain = addr.partition("@")
    if len(local) > LOCAL_PART_MAX_LENGTH or "--" in domain:
        return None
    domain = domain.lower()
    for special in email_validator.SPECIAL_USE_DOMAIN_NAMES:
        if domain == special or domain.endswith("." + special):
            return None
    if local.lower() in CASE_INSENSITIVE_MAILBOX_NAMES:
        local = local.lower()
    return f"{local}@{domain}"


def check_header(field: str, value: str) -> None:
    """No CR, LF, NUL or other control or line-break character (VT, FF, NEL, U+2028...)
    in any header value: some parsers split lines on them, which would let a caller
    add headers."""
    if not isinstance(value, str):
        raise HeaderInjectionError(field, "must be a string")
    if _HEADER_BREAKERS.search(value):
        raise HeaderInjectionError(
            field, "must not contain CR, LF, NUL or other control or line-break characters"
        )


def check_header_name(name: Any) -> None:
    """An extra header's name: printable ASCII without ':' (RFC 5322), and not one of
    the headers the message is built from."""
    if not isinstance(name, str) or not HEADER_NAME.match(name):
        raise HeaderInjectionError("headers", f"{name!r} is not a header name")
    if name.lower() in RESERVED_HEADERS:
        raise HeaderInjectionError("headers", f"{name} is set by mailqueue, not by callers")


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
