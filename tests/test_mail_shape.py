"""The richer message shape end to end: send_email -> Redis -> AppWorker -> the real SMTP
server, checked in the bytes it received (issue 15)."""

from __future__ import annotations

import base64
import logging
from datetime import date
from typing import Any

import pytest
from babel.dates import format_date
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from app import status
from app.mail import Attachment, send_email
from tests.servers import SMTPServer

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\xff" * 100
INVITE = b"BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"


def test_cc_bcc_reply_to_and_a_custom_header_on_the_wire(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    job = send_email(
        "ann@example.com",
        "Receipt",
        "test",
        address="Ann",
        cc=["Carl <carl@example.com>", "cleo@example.com"],
        bcc="accounting@example.com",
        reply_to=["support@example.com", "Sales <sales@example.com>"],
        headers={"X-Campaign": "spring-2030"},
    )
    work()
    [received] = smtp_server.wait_for(1)
    assert sorted(received.rcpt_tos) == sorted(
        ["ann@example.com", "carl@example.com", "cleo@example.com", "accounting@example.com"]
    )
    message = received.message
    assert [a.addr_spec for a in message["Cc"].addresses] == [
        "carl@example.com",
        "cleo@example.com",
    ]
    assert [a.addr_spec for a in message["Reply-To"].addresses] == [
        "support@example.com",
        "sales@example.com",
    ]
    assert message["X-Campaign"] == "spring-2030"
    # bcc: in the envelope only, in no header and nowhere in the bytes.
    assert b"accounting@example.com" not in received.raw
    assert "Bcc" not in message
    assert message["Message-ID"] == f"<{job.id}@example.com>"
    record = status.load(redis_client, job.id)
    assert record is not None and record.status == status.SENT
    assert record.bcc == ["accounting@example.com"]


def test_attachments_inline_image_and_calendar_invite_arrive_byte_for_byte(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    job = send_email(
        "ann@example.com",
        "Invoice",
        "test",
        address="Ann",
        attachments=[
            Attachment("invoice 2030-01.pdf", PDF),
            Attachment("logo.png", PNG, inline=True, content_id="logo@example.com"),
            {
                "filename": "meeting.ics",
                "data": INVITE,
                "content_type": "text/calendar; method=REQUEST; charset=utf-8",
            },
            Attachment("Rechnung-März.txt", "Grüße".encode()),
        ],
    )
    key = status.attachments_key(job.id)
    assert redis_client.get(key) == PDF + PNG + INVITE + "Grüße".encode()
    work()
    [received] = smtp_server.wait_for(1)
    message = received.message
    assert message.get_content_type() == "multipart/mixed"
    alternative = next(message.iter_parts())
    assert alternative.get_content_type() == "multipart/alternative"
    plain, related = alternative.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    html, logo = related.iter_parts()
    assert html.get_content_type() == "text/html"
    assert logo["Content-ID"] == "<logo@example.com>"
    assert logo.get_content() == PNG
    files = {part.get_filename(): part for part in message.iter_attachments()}
    assert files["invoice 2030-01.pdf"].get_content_type() == "application/pdf"  # guessed
    assert files["invoice 2030-01.pdf"].get_content() == PDF
    invite = files["meeting.ics"]
    assert invite.get_content_type() == "text/calendar"
    assert invite.get_param("method") == "REQUEST"
    assert invite.get_payload(decode=True) == INVITE
    assert files["Rechnung-März.txt"].get_payload(decode=True) == "Grüße".encode()
    # Sent: the bytes leave Redis; the record keeps names, types and sizes.
    assert redis_client.exists(key) == 0
    record = status.load(redis_client, job.id)
    assert record is not None and record.status == status.SENT
    assert record.attachments[0] == {
        "filename": "invoice 2030-01.pdf",
        "content_type": "application/pdf",
        "size": len(PDF),
    }
    assert record.attachments[1]["content_id"] == "logo@example.com"


def test_the_german_template_renders_under_the_german_locale(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any
) -> None:
    send_email("ann@example.com", "Test", "test", address="Ann", locale="de")
    send_email("bob@example.com", "Test", "test", address="Bob", locale="fr")  # no .fr files
    work()
    by_rcpt = {r.rcpt_tos[0]: r for r in smtp_server.wait_for(2)}
    german = by_rcpt["ann@example.com"].part("text/plain")
    assert "Hallo Ann" in german
    assert format_date(date.today(), "long", locale="de") in german
    assert "Es funktioniert" in by_rcpt["ann@example.com"].part("text/html")
    assert "Hello Bob" in by_rcpt["bob@example.com"].part("text/plain")


def test_tags_and_metadata_in_the_status_and_the_event_lines(
    client: FlaskClient, auth: dict[str, str], work: Any, caplog: pytest.LogCaptureFixture
) -> None:
    body = {
        "to": "ann@example.com",
        "subject": "Hi",
        "template": "test",
        "context": {"address": "Ann"},
        "tags": ["welcome", "onboarding"],
        "metadata": {"user_id": "42"},
        "attachments": [{"filename": "a.pdf", "content": base64.b64encode(PDF).decode()}],
    }
    with caplog.at_level(logging.INFO, logger="mailqueue.events"):
        response = client.post("/api/mail", json=body, headers=auth)
        assert response.status_code == 202, response.get_json()
        work()
    mail = client.get(f"/api/mail/{response.get_json()['id']}", headers=auth).get_json()
    assert mail["status"] == "sent"
    assert mail["tags"] == ["welcome", "onboarding"]
    assert mail["metadata"] == {"user_id": "42"}
    assert mail["attachments"] == [
        {"filename": "a.pdf", "content_type": "application/pdf", "size": len(PDF)}
    ]
    lines = [r.getMessage() for r in caplog.records if r.name == "mailqueue.events"]
    assert any("event=queued" in line and 'tags="welcome,onboarding"' in line for line in lines)
    assert any("event=sent" in line and "meta.user_id=42" in line for line in lines)


def test_failed_mail_drops_its_attachment_bytes(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    smtp_server.handler.refuse_rcpt["nobody@example.com"] = "550 5.1.1 no such user"
    job = send_email(
        "nobody@example.com", "x", "test", address="x", attachments=[Attachment("a.txt", b"abc")]
    )
    work()
    record = status.load(redis_client, job.id)
    assert record is not None and record.status == status.FAILED
    assert redis_client.exists(status.attachments_key(job.id)) == 0


def test_mails_of_every_shape_in_flight_at_once_each_get_their_own(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    work: Any,
    redis_client: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slot threads (app/inflight.py) render and build mails side by side: each keeps its
    own locale (Flask-Babel's state is per app context), attachments and copies."""
    monkeypatch.setenv("MAIL_CONCURRENCY", "4")
    smtp_server.handler.reply_delay = 0.03  # slow enough for the worker to use its slots
    sent: dict[str, tuple[str, bytes]] = {}
    for i in range(24):
        locale = "de" if i % 2 else ""
        data = f"file of mail {i}".encode() * (i + 1)
        send_email(
            f"user{i}@example.com",
            f"Mail {i}",
            "test",
            address=f"User {i}",
            cc=f"copy{i}@example.com",
            attachments=[Attachment(f"f{i}.txt", data)],
            locale=locale or None,
        )
        sent[f"user{i}@example.com"] = (locale, data)
    work()
    received = smtp_server.wait_for(24, timeout=30)
    for mail in received:
        to = next(a for a in mail.rcpt_tos if a.startswith("user"))
        i = to.removeprefix("user").partition("@")[0]
        locale, data = sent[to]
        assert sorted(mail.rcpt_tos) == sorted([to, f"copy{i}@example.com"])
        greeting = "Hallo" if locale else "Hello"
        assert f"{greeting} User {i}" in mail.part("text/plain")
        [attached] = list(mail.message.iter_attachments())
        assert attached.get_filename() == f"f{i}.txt"
        assert attached.get_payload(decode=True) == data
    assert not list(redis_client.scan_iter("mq:mail:*:attachments"))
    assert len(smtp_server.handler.connections) > 1, "the mails went out one at a time"


def test_a_bcc_alone_keeps_the_plain_fast_path_and_stays_out_of_the_headers(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any
) -> None:
    from app.mail import build_message, prepare

    record = prepare("ann@example.com", "Hi", "test", {"address": "Ann"}, bcc="audit@example.com")
    message = build_message(record)
    assert not (message.cc or message.attachments or message.reply_to_list)  # _compose path
    assert b"audit@example.com" not in message.as_bytes()
    send_email("ann@example.com", "Hi", "test", address="Ann", bcc="audit@example.com")
    work()
    [received] = smtp_server.wait_for(1)
    assert sorted(received.rcpt_tos) == ["ann@example.com", "audit@example.com"]
    assert b"audit@example.com" not in received.raw


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 76, 1000, 200_000])
def test_attachment_bodies_filled_in_after_flattening_are_the_stdlib_bytes(
    app_ctx: Flask, size: int
) -> None:
    """MailMessage.as_bytes writes attachment bodies as tokens and fills in their base64
    after (app/mail/parts.py): the bytes are Flask-Mail's own, boundaries and Date aside."""
    import re

    from flask_mail import Message

    from app.mail import build_message, prepare

    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    record = prepare(
        "ann@example.com",
        "Hi",
        "test",
        {"address": "Ann"},
        attachments=[
            Attachment("a.pdf", data),
            Attachment("logo.png", PNG, inline=True, content_id="logo@example.com"),
        ],
    )
    message = build_message(record)

    def normal(raw: bytes) -> bytes:
        return re.sub(rb"Date: [^\r]+|={15}\d+==", b"-", raw)

    assert normal(message.as_bytes()) == normal(Message.as_bytes(message))
