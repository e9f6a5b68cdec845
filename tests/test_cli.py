"""`flask mail send-test ADDRESS`."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from redis import Redis

from app import create_app, status
from tests.servers import SMTPServer, free_port


def test_send_test_queues_a_mail_that_the_worker_delivers(
    app: Flask, work: Any, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    result = app.test_cli_runner().invoke(args=["mail", "send-test", "ann@example.com"])
    assert result.exit_code == 0, result.output
    assert "queued test mail" in result.output
    mail_id = result.output.split()[3]
    work()
    [received] = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["ann@example.com"]
    assert received.message["Subject"] == "[Example] Test message"
    assert received.message_id == f"<{mail_id}@example.com>"
    assert "Hello ann@example.com," in received.part("text/plain")
    assert status.load(redis_client, mail_id).status == status.SENT  # type: ignore[union-attr]


@pytest.mark.parametrize("address", ["not-an-address", "ann@example.com\nBcc: eve@example.com"])
def test_send_test_refuses_a_bad_address_clearly(
    app: Flask, redis_client: Redis, address: str
) -> None:
    result = app.test_cli_runner().invoke(args=["mail", "send-test", address])
    assert result.exit_code != 0
    assert "Error: to: " in result.output
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize(
    "args",
    [
        ["mail", "send-test", "a@example.com"],
        ["digest", "preview", "a@example.com"],
        ["digest", "run"],
        ["mail", "failed"],
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_commands_say_in_one_line_when_redis_is_down(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    result = create_app().test_cli_runner().invoke(args=args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: Redis unavailable"), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
