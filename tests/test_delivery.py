"""End to end in one process: send_email -> Redis -> AppWorker -> SMTP."""

from __future__ import annotations

from typing import Any

from flask import Flask
from redis import Redis

from app import status
from app.mail import send_email
from tests.servers import SMTPServer


def test_send_email_is_delivered_as_multipart_alternative(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    job = send_email(["Ann <ann@example.com>", "bob@example.com"], "Hello", "test", address="<Ann>")
    assert status.load(redis_client, job.id).status == status.QUEUED  # type: ignore[union-attr]
    work()
    [received] = smtp_server.wait_for(1)
    msg = received.message
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["Subject"] == "[Example] Hello"
    assert msg["From"].addresses[0].addr_spec == "noreply@example.com"
    assert msg["Message-ID"] == f"<{job.id}@example.com>"
    assert sorted(received.rcpt_tos) == ["ann@example.com", "bob@example.com"]
    assert "Hello <Ann>," in received.part("text/plain")
    assert "Hello &lt;Ann&gt;," in received.part("text/html")
    assert "https://mail.example.com" in received.part("text/html")
    record = status.load(redis_client, job.id)
    assert record is not None and record.status == status.SENT and record.attempts == 1
    assert 0 < redis_client.ttl(status.key(job.id)) <= 7 * 24 * 3600
