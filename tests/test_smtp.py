"""The Mailer's SMTP conversation, with and without PIPELINING (RFC 2920) and CHUNKING
(RFC 3030), against
real servers: aiosmtpd (tests/servers.py) and, to see what goes out in one write, a
bare socket server that answers nothing until it has read DATA."""

from __future__ import annotations

import select
import smtplib
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask_mail import Message

from app import create_app
from app.errors import PermanentDeliveryError, TransientDeliveryError
from app.smtp import get_mailer
from app.smtpwire import sendmail_pipelined
from tests.servers import SMTPServer

SENDER = "noreply@example.com"
ANN, BOB = "ann@example.com", "bob@example.com"
BODY = "first\n.\n..two\n.three\nlast"  # a line that is only ".", and lines starting with "."


def message(*recipients: str, body: str = "hello") -> Message:
    # us-ascii: 7bit, so the lines starting with "." reach the wire as written
    return Message("Hi", sender=SENDER, recipients=list(recipients), body=body, charset="us-ascii")


@pytest.fixture(params=["pipelining", "chunking", "no-pipelining"])
def pipelining(request: pytest.FixtureRequest, smtp_server: SMTPServer, env: Any) -> bool:
    """The server's offer (set after env's reset, before any EHLO); True when it pipelines."""
    smtp_server.handler.pipelining = request.param != "no-pipelining"
    smtp_server.handler.chunking = request.param == "chunking"
    return bool(smtp_server.handler.pipelining)


def test_pipelining_is_used_exactly_when_the_server_offers_it(
    app_ctx: Flask, smtp_server: SMTPServer, pipelining: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    sendmail = smtplib.SMTP.sendmail

    def spy(self: smtplib.SMTP, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return sendmail(self, *args, **kwargs)

    monkeypatch.setattr(smtplib.SMTP, "sendmail", spy)
    assert get_mailer().send(message(ANN)) == {}
    assert len(calls) == (0 if pipelining else 1)
    assert [m.rcpt_tos for m in smtp_server.wait_for(1)] == [[ANN]]


def test_a_mail_with_lines_starting_with_a_dot_arrives_whole(
    app_ctx: Flask, smtp_server: SMTPServer, pipelining: bool
) -> None:
    get_mailer().send(message(ANN, BOB, body=BODY))
    [received] = smtp_server.wait_for(1)
    assert received.mail_from == SENDER
    assert sorted(received.rcpt_tos) == [ANN, BOB]
    assert (
        received.raw.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n") == BODY.replace("\n", "\r\n").encode()
    )


# (server knobs, recipients, what Mailer.send returns or raises with which text)
OUTCOMES: dict[str, tuple[dict[str, Any], list[str], Any, str]] = {
    "one recipient refused": (
        {"refuse_rcpt": {BOB: "550 5.1.1 no such user"}}, [ANN, BOB],
        {BOB: "550 5.1.1 no such user"}, "",
    ),
    "all refused, 550": (
        {"refuse_rcpt": {ANN: "550 5.1.1 gone", BOB: "550 5.1.1 gone"}}, [ANN, BOB],
        PermanentDeliveryError, "all recipients refused: ", # and each, in any order
    ),
    "all refused, 450": (
        {"refuse_rcpt": {ANN: "450 4.2.1 busy"}}, [ANN],
        TransientDeliveryError, "all recipients refused: ann@example.com: 450 4.2.1 busy",
    ),
    "sender refused": (
        {"refuse_mail": "553 5.7.1 sender rejected"}, [ANN],
        PermanentDeliveryError, "SMTP server refused: 553 5.7.1 sender rejected",
    ),
    "sender deferred": (
        {"refuse_mail": "451 4.7.1 greylisted"}, [ANN],
        TransientDeliveryError, "SMTP server deferred: 451 4.7.1 greylisted",
    ),
    "DATA refused": (
        {"data_command_reply": "554 5.7.1 no thanks"}, [ANN],
        PermanentDeliveryError, "SMTP server refused: 554 5.7.1 no thanks",
    ),
    "DATA deferred": (
        {"data_command_reply": "421 4.3.2 shutting down"}, [ANN],
        TransientDeliveryError, "SMTP server deferred: 421 4.3.2 shutting down",
    ),
    "body refused": (
        {"reply": "550 5.7.1 spam"}, [ANN],
        PermanentDeliveryError, "SMTP server refused: 550 5.7.1 spam",
    ),
    "body deferred": (
        {"reply": "451 4.3.0 try later"}, [ANN],
        TransientDeliveryError, "SMTP server deferred: 451 4.3.0 try later",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("knobs", "recipients", "outcome", "text"), OUTCOMES.values(), ids=OUTCOMES
)
def test_refusals_are_sorted_as_before(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    pipelining: bool,
    knobs: dict[str, Any],
    recipients: list[str],
    outcome: Any,
    text: str,
) -> None:
    for name, value in knobs.items():
        setattr(smtp_server.handler, name, value)
    mailer = get_mailer()
    if isinstance(outcome, dict):
        assert mailer.send(message(*recipients)) == outcome
        assert len(smtp_server.wait_for(1)) == 1
    else:
        with pytest.raises(outcome) as caught:
            mailer.send(message(*recipients))
        assert str(caught.value).startswith(text)
        assert all(
            f"{address}: {reply}" in str(caught.value)
            for address, reply in knobs.get("refuse_rcpt", {}).items()
        )
        assert smtp_server.messages == []
    # and the next mail goes through
    for name in knobs:
        setattr(smtp_server.handler, name, {} if name == "refuse_rcpt" else None)
    assert mailer.send(message(ANN)) == {}


def test_a_connection_the_server_dropped_is_reopened_once(
    app_ctx: Flask, smtp_server: SMTPServer, pipelining: bool
) -> None:
    mailer = get_mailer()
    mailer.send(message(ANN))
    host = mailer._idle[-1].connection.host
    assert host is not None and host.sock is not None
    smtp_server.handler.drop_connections()
    assert select.select([host.sock], [], [], 5)[0], "the server did not close the connection"
    mailer.send(message(BOB))
    assert [m.rcpt_tos for m in smtp_server.wait_for(2)] == [[ANN], [BOB]]
    assert len(smtp_server.handler.connections) == 2


def test_a_reply_that_times_out_after_the_body_is_not_sent_again(
    app_ctx: Flask, smtp_server: SMTPServer, pipelining: bool
) -> None:
    """The server may have taken a mail whose reply never came: the send fails
    (transient: the job retries after its lease, checking the record first) and
    is not repeated at once on a new connection, reused or not."""
    app_ctx.config["MAIL_TIMEOUT"] = 0.3
    mailer = get_mailer()
    mailer.send(message(ANN))  # the connection is open and reused below
    smtp_server.handler.hang_seconds = 1.0  # the reply to the end of DATA comes too late
    with pytest.raises(TransientDeliveryError, match="SMTP"):
        mailer.send(message(BOB))
    # A second attempt would have opened a second connection inside send().
    assert len(smtp_server.handler.connections) == 1
    smtp_server.handler.hang_seconds = 0.0
    assert mailer.send(message(BOB)) == {}  # the job's retry, later
    assert [m.rcpt_tos for m in smtp_server.wait_for(2)] == [[ANN], [BOB]]
    assert len(smtp_server.handler.connections) == 2


def test_a_421_to_mail_from_on_a_reused_connection_is_retried_on_a_new_one(
    app_ctx: Flask, smtp_server: SMTPServer, pipelining: bool
) -> None:
    """How some servers announce an idle timeout: nothing of the mail went out yet."""
    mailer = get_mailer()
    mailer.send(message(ANN))
    smtp_server.handler.mail_replies = ["421 4.4.2 idle too long, closing"]
    assert mailer.send(message(BOB)) == {}
    assert [m.rcpt_tos for m in smtp_server.wait_for(2)] == [[ANN], [BOB]]
    assert len(smtp_server.handler.connections) == 2


def test_a_new_connection_that_fails_is_not_tried_again_at_once(
    app_ctx: Flask, smtp_server: SMTPServer, pipelining: bool
) -> None:
    smtp_server.handler.mail_replies = ["421 4.3.2 shutting down"]
    with pytest.raises(TransientDeliveryError, match="421"):
        get_mailer().send(message(ANN))
    assert len(smtp_server.handler.connections) == 1
    assert get_mailer().send(message(BOB)) == {}


def outcome_of(send: Callable[[], dict[str, tuple[int, bytes]]]) -> object:
    try:
        return send()
    except smtplib.SMTPException as err:
        return type(err), err.args


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
@pytest.mark.parametrize(("knobs", "recipients"), [o[:2] for o in OUTCOMES.values()], ids=OUTCOMES)
def test_the_pipelined_transaction_answers_as_sendmail_does(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    knobs: dict[str, Any],
    recipients: list[str],
    chunking: bool,
) -> None:
    """Same return value or exception, and the connection is left in step: the
    next transaction on it goes through (every reply was read before RSET)."""
    handler = smtp_server.handler
    outcomes = []
    for send in (smtplib.SMTP.sendmail, sendmail_pipelined):
        handler.chunking = chunking  # sendmail itself never uses BDAT
        for name, value in knobs.items():
            setattr(handler, name, value)
        with smtplib.SMTP("127.0.0.1", smtp_server.port, timeout=5) as host:
            host.ehlo()
            assert host.has_extn("pipelining")
            msg = message(*recipients).as_bytes()
            outcomes.append(outcome_of(lambda: send(host, SENDER, recipients, msg)))  # noqa: B023
            if send is sendmail_pipelined and host.sock is not None:
                handler.reset()
                handler.chunking = chunking  # as this connection's EHLO said
                assert sendmail_pipelined(host, SENDER, [ANN], msg) == {}
                assert [m.rcpt_tos for m in handler.wait_for(1)] == [[ANN]]
    assert outcomes[0] == outcomes[1]


class HoldingServer:
    """Offers PIPELINING, then sends no reply until it has read DATA: a client waiting
    for the reply to MAIL stalls it (and times out). Records what it read."""

    def __init__(self, rcpt_reply: bytes = b"250 OK\r\n") -> None:
        self.rcpt_reply = rcpt_reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.commands: list[bytes] = []
        self.body = b""
        self.thread = threading.Thread(target=self._serve_one)
        self.thread.start()

    def _serve_one(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.settimeout(10)
            conn.sendall(b"220 holding ESMTP\r\n")
            lines.readline()  # EHLO
            conn.sendall(b"250-holding\r\n250 PIPELINING\r\n")
            while not self.commands or self.commands[-1] != b"DATA\r\n":
                self.commands.append(lines.readline())
            rcpt_replies = self.rcpt_reply * (len(self.commands) - 2)
            conn.sendall(b"250 OK\r\n" + rcpt_replies + b"354 go on\r\n")
            while not self.body.endswith(b"\r\n.\r\n"):
                line = lines.readline()
                if not line:
                    return  # the client hung up
                self.body += line
            conn.sendall(b"250 OK\r\n")
            lines.readline()  # QUIT
            conn.sendall(b"221 bye\r\n")

    def close(self) -> None:
        self.thread.join(timeout=15)
        self.listener.close()


def test_mail_rcpt_and_data_go_out_before_any_reply(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = HoldingServer()
    try:
        monkeypatch.setenv("MAIL_PORT", str(server.port))
        app = create_app({"TESTING": True})
        with app.app_context():
            refused = get_mailer().send(message(ANN, BOB, body=BODY))
            get_mailer().close()
    finally:
        server.close()
    assert refused == {}
    assert server.commands[0] == b"MAIL FROM:<noreply@example.com>\r\n"
    assert sorted(server.commands[1:3]) == [
        b"RCPT TO:<ann@example.com>\r\n",
        b"RCPT TO:<bob@example.com>\r\n",
    ]
    assert server.commands[3:] == [b"DATA\r\n"]
    # dot-stuffed as smtplib does it, CRLF added before the final dot
    assert server.body.endswith(b"\r\n\r\nfirst\r\n..\r\n...two\r\n..three\r\nlast\r\n.\r\n")


def test_a_server_that_takes_data_without_a_recipient_gets_no_body() -> None:
    """RFC 2920 wants 503/554 to DATA then; should 354 come, only hanging up aborts."""
    server = HoldingServer(rcpt_reply=b"550 5.1.1 no such user\r\n")
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as host:
            host.ehlo()
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                sendmail_pipelined(host, SENDER, [ANN], b"Subject: x\r\n\r\nhello\r\n")
            assert host.sock is None
    finally:
        server.close()
    assert server.body == b""


class ChunkingServer:
    """Offers PIPELINING and CHUNKING, then reads until it has the whole BDAT chunk
    before it answers anything: a client that waited for any reply would stall."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve_one)
        self.thread.start()

    def _serve_one(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as stream:
            conn.settimeout(10)
            conn.sendall(b"220 chunking ESMTP\r\n")
            stream.readline()  # EHLO
            conn.sendall(b"250-chunking\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
            lines = [stream.readline() for _ in range(4)]  # MAIL, RCPT, RCPT, BDAT
            size = int(lines[-1].split()[1])
            self.received = b"".join(lines) + stream.read(size)
            conn.sendall(b"250 OK\r\n250 OK\r\n250 OK\r\n250 2.0.0 queued\r\n")
            stream.readline()  # QUIT
            conn.sendall(b"221 bye\r\n")

    def close(self) -> None:
        self.thread.join(timeout=15)
        self.listener.close()


def test_with_chunking_the_whole_mail_goes_out_before_any_reply(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round trip a mail: envelope and body in one write, the body as it is."""
    server = ChunkingServer()
    try:
        monkeypatch.setenv("MAIL_PORT", str(server.port))
        app = create_app({"TESTING": True})
        with app.app_context():
            refused = get_mailer().send(message(ANN, BOB, body=BODY))
            get_mailer().close()
    finally:
        server.close()
    assert refused == {}
    head, body = server.received.split(b"BDAT ", 1)
    assert head.startswith(b"MAIL FROM:<noreply@example.com>\r\nRCPT TO:<")
    size, mail = body.split(b" LAST\r\n", 1)
    assert int(size) == len(mail)
    # not dot-stuffed: BDAT's length says where the mail ends
    assert mail.endswith(b"\r\n\r\nfirst\r\n.\r\n..two\r\n.three\r\nlast\r\n")


def test_an_idle_connection_the_server_closed_is_not_used_for_a_chunked_mail(
    app_ctx: Flask, smtp_server: SMTPServer
) -> None:
    """With BDAT the body leaves with the envelope, so a hang-up found only after the
    write could mean a delivered mail; one already visible is found before it."""
    smtp_server.handler.chunking = True
    mailer = get_mailer()
    mailer.send(message(ANN))
    host = mailer._idle[-1].connection.host
    assert host is not None and host.has_extn("chunking")
    smtp_server.handler.drop_connections()
    assert select.select([host.sock], [], [], 5)[0], "the server did not close the connection"
    assert mailer.send(message(BOB)) == {}  # on a new connection, at once
    assert [m.rcpt_tos for m in smtp_server.wait_for(2)] == [[ANN], [BOB]]
    assert len(smtp_server.handler.connections) == 2


def test_the_first_mail_logs_what_the_server_offers(
    app_ctx: Flask, smtp_server: SMTPServer, pipelining: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mailqueue.smtp")
    mailer = get_mailer()
    mailer.send(message(ANN))
    mailer.send(message(BOB))
    [line] = [r.getMessage() for r in caplog.records if "offers" in r.getMessage()]
    if smtp_server.handler.chunking:
        assert "PIPELINING and CHUNKING: 1 round trip a mail" in line
    elif pipelining:
        assert "offers PIPELINING: 2 round trips a mail" in line
    else:
        assert "neither PIPELINING nor CHUNKING: 3+ round trips a mail" in line
