"""A round trip through a real Postfix (issue 15's proof): mailqueue's worker hands a mail
of the full shape to Postfix over STARTTLS; Postfix relays it to the recording SMTP server,
whose received bytes are checked. Postfix re-queues and re-writes the message on the way,
so this also shows the MIME tree and headers survive a real MTA.

Skipped only when Postfix is absent (`apt-get install postfix`; `.ci/run` installs it) or
not run as root; tests/postfix.py runs a private instance, never the machine's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from flask import Flask
from redis import Redis

from app import create_app, status
from app.mail import Attachment, send_email
from tests import postfix
from tests.servers import SMTPServer, free_port

pytestmark = pytest.mark.slow

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 800 + b"\n%%EOF\n"  # ~200 KB, every byte value
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\xff" * 100


@pytest.fixture(scope="module")
def relay(tls_ca: trustme.CA, smtp_server: SMTPServer) -> Iterator[postfix.PostfixRelay]:
    why = postfix.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why + " (CI is set: .ci/run should have installed it)")
        pytest.skip(why)
    started = postfix.PostfixRelay(free_port(), smtp_server.port, tls_ca).start()
    yield started
    started.stop()


@pytest.fixture
def postfix_app(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    relay: postfix.PostfixRelay,
    tls_ca: trustme.CA,
    tmp_path: Path,
) -> Flask:
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    for key, value in {
        "MAIL_PORT": str(relay.port),
        "MAIL_USE_TLS": "true",
        "MAIL_TLS_CA_FILE": str(ca_file),
    }.items():
        monkeypatch.setenv(key, value)
    return create_app({"TESTING": True})


def test_the_full_shape_through_postfix_over_starttls(
    postfix_app: Flask,
    relay: postfix.PostfixRelay,
    smtp_server: SMTPServer,
    work: Any,
    redis_client: Redis,
) -> None:
    with postfix_app.app_context():
        job = send_email(
            "ann@example.com",
            "Invoice",
            "test",
            address="Ann",
            cc="Carl <carl@example.com>",
            bcc="accounting@example.com",
            reply_to="billing@example.com",
            headers={"X-Invoice": "INV-42"},
            attachments=[
                Attachment("invoice.pdf", PDF),
                Attachment("logo.png", PNG, inline=True, content_id="logo@example.com"),
            ],
            locale="de",
        )
    work()
    [received] = smtp_server.wait_for(1, timeout=30)
    assert sorted(received.rcpt_tos) == [
        "accounting@example.com",
        "ann@example.com",
        "carl@example.com",
    ]
    message = received.message
    # Postfix's own Received line: it took the mail over TLS (ESMTPS).
    assert "by postfix.test (Postfix) with ESMTPS" in message["Received"]
    assert "using TLSv1." in message["Received"]
    assert message["Message-ID"] == f"<{job.id}@example.com>"
    assert str(message["Cc"]) == "Carl <carl@example.com>"
    assert str(message["Reply-To"]) == "billing@example.com"
    assert message["X-Invoice"] == "INV-42"
    assert b"accounting@example.com" not in received.raw  # bcc: envelope only
    files = {part.get_filename(): part for part in message.iter_attachments()}
    assert files["invoice.pdf"].get_content() == PDF
    logo = next(p for p in message.walk() if p.get("Content-ID") == "<logo@example.com>")
    assert logo.get_content() == PNG
    assert "Hallo Ann" in received.part("text/plain")
    record = status.load(redis_client, job.id)
    assert record is not None and record.status == status.SENT
    assert redis_client.exists(status.attachments_key(job.id)) == 0
    assert f"{job.id}@example.com" in relay.log_text()  # cleanup logged our Message-ID
