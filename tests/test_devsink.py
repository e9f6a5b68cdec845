"""The dev SMTP sink: every message stored as an .eml file, one log line each."""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from app.devsink import HOST, make_controller
from tests.servers import free_port


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[int, Path, Controller]]:
    outbox = tmp_path / "outbox"
    port = free_port()
    controller = make_controller(outbox, port)
    controller.start()
    yield port, outbox, controller
    controller.stop()


def test_sink_stores_each_message_and_logs_one_line(
    sink: tuple[int, Path, Controller], caplog: pytest.LogCaptureFixture
) -> None:
    port, outbox, _ = sink
    message = EmailMessage()
    message["From"] = "App <app@example.com>"
    message["To"] = "ann@example.com"
    message["Subject"] = "Grüße"
    message.set_content("hello\n.leading dot\n")
    with (
        caplog.at_level(logging.INFO, logger="mailqueue.devsink"),
        smtplib.SMTP(HOST, port, timeout=5) as client,
    ):
        client.send_message(message, to_addrs=["ann@example.com", "bob@example.com"])
        client.send_message(message)
    files = sorted(outbox.glob("*.eml"))
    assert len(files) == 2
    assert not list(outbox.glob(".*"))  # no partial files left behind
    stored = BytesParser(policy=default_policy).parsebytes(files[0].read_bytes())
    assert stored["Subject"] == "Grüße"
    # Stored as received: CRLF line endings, dot-stuffing undone.
    assert stored.get_content().replace("\r\n", "\n") == "hello\n.leading dot\n"
    lines = [r.getMessage() for r in caplog.records if r.name == "mailqueue.devsink"]
    assert len(lines) == 2
    assert lines[0] == (
        f"from=app@example.com to=ann@example.com,bob@example.com subject='Grüße' file={files[0]}"
    )


def test_sink_listens_on_loopback_only(sink: tuple[int, Path, Controller]) -> None:
    port, _, controller = sink
    assert controller.server is not None
    bound = {sock.getsockname()[:2] for sock in controller.server.sockets}
    assert bound == {("127.0.0.1", port)}
