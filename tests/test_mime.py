"""MailMessage.as_bytes (the direct serialiser) says what Flask-Mail's own path says."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest
from flask import Flask
from flask_mail import Message

from app.errors import HeaderInjectionError
from app.mail import MailMessage

LONG_LINE = "<p>" + "wide " * 400 + "</p>"  # one 2,000-character line, as minified html has

CASES: dict[str, dict[str, Any]] = {
    "text and html": {"body": "Hello Ann,\n\nBye.\n", "html": "<p>Hello Ann,</p>\n"},
    "text only": {"body": "Just text.\n.\nA lone dot above.\n"},
    "non-ASCII everywhere": {
        "subject": "Grüße aus Köln — ✓",
        "recipients": ["Zoë Ñandú <zoe@example.com>", "bob@example.com"],
        "sender": "Ünïcode Sender <noreply@example.com>",
        "body": "Café crème, naïve résumé.\n",
        "html": "<p>Café — ✓</p>",
    },
    "long lines and long headers": {
        "subject": "A subject that goes on " * 8,
        "recipients": [f"user{i}@example.com" for i in range(12)],
        "body": "x" * 1500 + "\n",
        "html": LONG_LINE,
        "extra_headers": {
            "List-Unsubscribe": "<https://mail.example.com/unsubscribe/" + "t" * 120 + ">",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    },
    "CRLF and trailing spaces": {
        "body": "line one  \r\nline two\rline three\n",
        "html": "<b>x</b>",
    },
}


def build(cls: type[Message], spec: dict[str, Any]) -> Message:
    values = {
        "subject": "Hello",
        "recipients": ["ann@example.com"],
        "sender": "Example App <noreply@example.com>",
        **spec,
    }
    message = cls(**values)
    message.msgId = "<fixed-id@example.com>"
    message.date = 1_700_000_000.0
    return message


def parse(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_bytes_mean_what_flask_mails_bytes_mean(app_ctx: Flask, case: str) -> None:
    spec = CASES[case]
    fast = build(MailMessage, spec).as_bytes()
    stock = Message.as_bytes(build(MailMessage, spec))  # Flask-Mail's path, our _message
    ours, theirs = parse(fast), parse(stock)

    assert ours.get_content_type() == theirs.get_content_type()
    for name in (
        "Subject",
        "From",
        "Message-ID",
        "Date",
        "MIME-Version",
        *spec.get("extra_headers", {}),
    ):
        assert str(ours[name]) == str(theirs[name]), name
    # Flask-Mail de-duplicates recipients through a set, so its order varies.
    assert sorted(a.addr_spec for a in ours["To"].addresses) == sorted(
        a.addr_spec for a in theirs["To"].addresses
    )
    assert [a.display_name for a in ours["To"].addresses if a.display_name] == [
        a.display_name for a in theirs["To"].addresses if a.display_name
    ]
    ours_parts = [
        (p.get_content_type(), p.get_content()) for p in ours.walk() if not p.is_multipart()
    ]
    theirs_parts = [
        (p.get_content_type(), p.get_content()) for p in theirs.walk() if not p.is_multipart()
    ]
    assert ours_parts == theirs_parts

    # Wire rules: ASCII only, CRLF line ends, no line over 998 characters.
    assert fast.isascii()
    assert b"\n" not in fast.replace(b"\r\n", b"")
    assert max(len(line) for line in fast.split(b"\r\n")) <= 998


def test_ascii_names_stay_readable_on_the_wire(app_ctx: Flask) -> None:
    raw = build(MailMessage, {"body": "x", "recipients": ['"Carol, C." <carol@example.com>']})
    head = raw.as_bytes().split(b"\r\n\r\n", 1)[0]
    assert b"\r\nFrom: Example App <noreply@example.com>\r\n" in head
    assert b'\r\nTo: "Carol, C." <carol@example.com>\r\n' in head


def test_other_shapes_keep_flask_mails_path(app_ctx: Flask) -> None:
    message = build(MailMessage, {"body": "x", "cc": ["carol@example.com"]})
    assert message.as_bytes() == Message.as_bytes(message)


@pytest.mark.parametrize(
    "spec",
    [
        {"subject": "Hi\r\nBcc: victim@example.com"},
        {"extra_headers": {"List-Unsubscribe": "<https://x.example/u>\r\nBcc: v@example.com"}},
        {"recipients": ["Ann\n <ann@example.com>"]},
    ],
)
def test_a_header_break_that_slipped_past_validation_is_refused_at_send(
    app_ctx: Flask, spec: dict[str, Any]
) -> None:
    with pytest.raises(HeaderInjectionError):
        build(MailMessage, {"body": "x", "html": "<p>x</p>", **spec}).as_bytes()


def test_building_messages_resolves_the_host_name_once(
    app_ctx: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flask-Mail's Message() would call socket.getfqdn() (reverse DNS) for every mail."""
    import socket

    import app.mail.mime

    lookups: list[str] = []
    monkeypatch.setattr(socket, "getfqdn", lambda name="": lookups.append(name) or "host.test")
    app.mail.mime._host_fqdn.cache_clear()
    messages = [MailMessage(subject="Hi", recipients=["ann@example.com"]) for _ in range(3)]
    app.mail.mime._host_fqdn.cache_clear()  # forget the fake name
    assert len(lookups) == 1
    assert all(m.msgId.endswith("@host.test>") for m in messages)
