"""The one workload every row sends, and the app configuration it runs under.

Mail `i` is the `test` template (text + html through the shared layout, about
1.7 KB on the wire) to `user<i>@example.com`; row (p) attaches `pdf_attachment()`
(200 KB, ~272 KB in base64 on the wire) to each. Rows that are not mailqueue set
their own Message-ID `<bench-<row>-<i>@example.com>` so the sink can match
what it received to when it was submitted; mailqueue's Message-ID is
`<mail id@example.com>` already.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from flask import Flask, render_template
from flask_mail import Message

SENDER = "Bench <bench@example.com>"
SENDER_DOMAIN = "example.com"
TEMPLATE = "test"


def app_env(redis_url: str, smtp_port: int) -> dict[str, str]:
    """The environment of a deployment that sends to the sink (what workers read)."""
    return {
        "REDIS_URL": redis_url,
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": str(smtp_port),
        "MAIL_DEFAULT_SENDER": SENDER,
        "MAIL_TIMEOUT": "10",
        "PUBLIC_URL": "https://bench.example.com",
        "SECRET_KEY": "bench-secret-not-secret",
        "API_TOKEN": "bench-token",
    }


def make_app() -> Flask:
    """mailqueue's app, configured from the environment the harness set."""
    from app import create_app

    return create_app()


def mail(i: int) -> tuple[str, str, dict[str, Any]]:
    """(to, subject, context) of mail `i`."""
    return f"user{i}@example.com", f"Your bench report {i}", {"address": f"User {i}"}


PDF_BYTES = 200 * 1000  # row (p)'s attachment: an invoice-sized PDF


@functools.cache
def pdf_attachment() -> bytes:
    """Row (p)'s 200 KB "PDF": a PDF header and trailer around seeded random bytes, as
    incompressible as a real PDF's compressed streams (the same bytes every run)."""
    head, tail = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", b"\n%%EOF\n"
    body = random.Random(15).randbytes(PDF_BYTES - len(head) - len(tail))
    return head + body + tail


def message_id(row: str, i: int) -> str:
    return f"<bench-{row}-{i}@{SENDER_DOMAIN}>"


def classic_message(msg_id: str, to: str, subject: str, context: dict[str, Any]) -> Message:
    """What the classic Flask-Mail recipe builds: both parts rendered with
    `render_template` into a plain Flask-Mail Message. Needs an app context."""
    msg = Message(subject, sender=SENDER, recipients=[to])
    msg.body = render_template(f"email/{TEMPLATE}.txt", **context)
    msg.html = render_template(f"email/{TEMPLATE}.html", **context)
    msg.msgId = msg_id
    return msg
