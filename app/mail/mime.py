"""The message on the wire: a record's Flask-Mail Message with its stable Message-ID,
and the direct serialiser of the common text + html shape.
"""

from __future__ import annotations

import binascii
import functools
import socket
import uuid
from collections.abc import Mapping
from email.header import Header
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from typing import Any

import flask_mail
from flask import current_app
from flask_mail import Message, sanitize_address

from app import status
from app.mail import attachments, parts
from app.mail.headers import check_header
from app.mail.rendering import render_email


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
    a worker's CPU (see docs/performance.md). `as_bytes` writes the same MIME
    structure in a few tens of microseconds; any other shape (attachments, cc,
    reply-to, other alternatives or charsets) keeps Flask-Mail's own path, but for
    the body of a mail with attachments (app/mail/parts.py) and an ordered Cc and a
    Reply-To of several addresses (`reply_to_list`). Bcc goes in no header.
    """

    def __init__(self, *args: Any, reply_to_list: list[str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reply_to_list = reply_to_list or []  # Reply-To, one address or several
        # Set while as_bytes flattens: attachment bodies as tokens (parts.fill_placeholders).
        self._placeholders: dict[bytes, bytes] | None = None

    def as_bytes(self) -> bytes:
        if self.attachments:
            self._placeholders = {}
            try:
                return parts.fill_placeholders(super().as_bytes(), self._placeholders)
            finally:
                self._placeholders = None
        if (
            self.cc
            or self.reply_to
            or self.reply_to_list
            or set(self.alts) - {"html"}
            or (self.charset or "utf-8").lower() != "utf-8"
        ):
            return super().as_bytes()
        return _compose(self)

    def _message(self) -> Any:
        attached, self.attachments = self.attachments, []
        try:
            message: Any = super()._message()  # its headers, and the body without files
        finally:
            self.attachments = attached
        payload = message.get_payload()
        if attached:
            inner: Any = parts.body_tree(self.body or "", self.html, attached, self._placeholders)
        elif (
            message.get_content_type() == "multipart/mixed"
            and len(payload) == 1
            and payload[0].get_content_type() == "multipart/alternative"
        ):
            inner = payload[0]
        else:
            inner = None
        if inner is not None:
            for name, value in message.items():
                if name.lower() not in ("content-type", "mime-version"):
                    inner[name] = value
            inner.policy = message.policy
            message = inner
        if self.cc:  # in the order given (Flask-Mail joins a set)
            cc = ", ".join(dict.fromkeys(sanitize_address(a, "utf-8") for a in self.cc))
            message.replace_header("Cc", cc)
        if self.reply_to_list:
            check_header("Reply-To", ", ".join(self.reply_to_list))
            message["Reply-To"] = ", ".join(
                sanitize_address(a, "utf-8") for a in self.reply_to_list
            )
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
    rendered = render_email(
        record.template, record.locale, **(record.context if context is None else context)
    )
    prefix = config["MAIL_SUBJECT_PREFIX"]
    message = MailMessage(
        subject=f"{prefix} {record.subject}" if prefix else record.subject,
        recipients=list(record.to),
        body=rendered.text,
        html=rendered.html,
        sender=config["MAIL_DEFAULT_SENDER"],
        extra_headers=dict(record.headers) or None,
        cc=list(record.cc) or None,
        bcc=list(record.bcc) or None,
        reply_to_list=list(record.reply_to),
    )
    message.msgId = message_id(record.id, config["MAIL_DEFAULT_SENDER"])
    datas = attachments.split(record.attachments, record.attachment_data)
    for entry, data in zip(record.attachments, datas, strict=True):
        cid = entry.get("content_id")
        message.attach(
            entry["filename"],
            entry["content_type"],
            data,
            "inline" if entry.get("inline") else "attachment",
            {"Content-ID": f"<{cid}>"} if cid else None,
        )
    return message


def message_id(mail_id: str, sender: str) -> str:
    """`<id@sender-domain>`: the same on every attempt, so duplicates are recognisable."""
    return f"<{mail_id}@{_sender_domain(sender)}>"


@functools.lru_cache(maxsize=64)
def _sender_domain(sender: str) -> str:
    # Parsed once per sender, not once per mail (the sender is the configured one).
    return parseaddr(sender)[1].rpartition("@")[2] or "mailqueue.invalid"
