"""SMTP delivery over reused connections, up to MAIL_CONCURRENCY per process, with timeouts.

Flask-Mail opens a connection per `send` and has no timeout (flask-mail #114,
#38). A worker keeps a small pool of Flask-Mail `Connection`s, each built with a
socket timeout and carrying one mail at a time: as many as it has mails in
flight (app/inflight.py), never more than MAIL_CONCURRENCY. A reused connection
saves the connect, greeting, EHLO, STARTTLS and AUTH round trips of a new one; a
connection the server has dropped is reopened once; one idle for
MAIL_IDLE_TIMEOUT seconds is closed by a sweeper thread. A server that offers
PIPELINING gets each mail in two round trips instead of 3 + one per recipient.
SMTP failures are sorted here into transient (retry) and permanent (fail now),
keeping the server's reply. With MAIL_MAX_PER_SECOND set, every send first takes
a fleet-wide permit (app/ratelimit.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions
from flask import Flask, current_app
from flask_mail import Connection, Mail, Message, sanitize_address
from rq.timeouts import JobTimeoutException

from app.errors import PermanentDeliveryError, TransientDeliveryError
from app.mail import BARE_ADDRESS
from app.ratelimit import RateLimiter

log = logging.getLogger("mailqueue.smtp")

EXTENSION = "mailqueue.smtp"


class _BodyTracking:
    """An SMTP client that notes when a message body may have reached the server.
    From then on a lost connection may mean a delivered mail: never send it again
    at once (the job's retry, after the lease, checks the record first)."""

    body_may_be_sent = False

    def data(self, msg: Any) -> tuple[int, bytes]:  # sendmail's last step (no PIPELINING)
        self.body_may_be_sent = True
        reply: tuple[int, bytes] = super().data(msg)  # type: ignore[misc]
        return reply


class _SMTP(_BodyTracking, smtplib.SMTP):
    pass


class _SMTP_SSL(_BodyTracking, smtplib.SMTP_SSL):
    pass


class TimeoutConnection(Connection):
    """Flask-Mail's Connection, but every socket operation has a deadline."""

    def __init__(self, mail: Any, timeout: float, ca_file: str | None = None) -> None:
        super().__init__(mail)
        self.timeout = timeout
        self.ca_file = ca_file

    def configure_host(self) -> smtplib.SMTP | smtplib.SMTP_SSL:
        host: smtplib.SMTP | smtplib.SMTP_SSL
        # The system's CAs, or only MAIL_TLS_CA_FILE's; certificates are always verified.
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.mail.use_ssl:
            host = _SMTP_SSL(
                self.mail.server, self.mail.port, timeout=self.timeout, context=context
            )
        else:
            host = _SMTP(self.mail.server, self.mail.port, timeout=self.timeout)
        try:
            if self.mail.use_tls:
                host.starttls(context=context)
            if self.mail.username and self.mail.password:
                host.login(self.mail.username, self.mail.password)
        except BaseException:
            host.close()
            raise
        return host


class _Pooled:
    """One open SMTP connection of a Mailer's pool, and when it last carried a mail."""

    def __init__(self, connection: TimeoutConnection) -> None:
        self.connection = connection
        self.last_used = time.monotonic()

    @property
    def host(self) -> _SMTP | _SMTP_SSL:
        host = self.connection.host
        assert isinstance(host, _SMTP | _SMTP_SSL)
        return host

    def close(self) -> None:
        """Quit politely if possible; never raise."""
        host = self.connection.host
        if host is None:
            return
        try:
            host.quit()
        except (smtplib.SMTPException, OSError):
            host.close()


class Mailer:
    """One process's SMTP connections: up to MAIL_CONCURRENCY, each carrying one mail at
    a time, opened lazily, reused most-recently-used first, closed when idle."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.size: int = app.config["MAIL_CONCURRENCY"]
        self._idle: list[_Pooled] = []  # open, not in use; the most recently used last
        self._in_use: dict[int, _Pooled] = {}  # by the thread using it (abort())
        self._free = threading.BoundedSemaphore(self.size)  # a permit per connection
        self._lock = threading.Lock()
        self._sweeping = False
        self._limiter: RateLimiter | None = None
        self._rate: float | None = app.config.get("MAIL_MAX_PER_SECOND")

    def send(self, message: Message) -> dict[str, str]:
        """Deliver `message`; return the recipients the server refused (code and reply).

        Waits for a free connection when MAIL_CONCURRENCY sends are under way.
        Raises TransientDeliveryError or PermanentDeliveryError.
        """
        with self._free:
            pooled = self._take()
            try:
                return self._send(pooled, message)
            finally:
                with self._lock:
                    self._in_use.pop(threading.get_ident(), None)

    def _send(self, pooled: _Pooled | None, message: Message) -> dict[str, str]:
        reusing = pooled is not None
        try:
            pooled = self._checked_out(pooled)
            refused = _send_once(pooled, message, self._permit)
        except Exception as err:
            stale = reusing and _dropped(err) and not _body_may_be_sent(pooled)
            if pooled is not None:
                pooled.close()
            if not stale:
                raise classify(err) from err
        else:
            self._put_back(pooled)
            return refused
        # A reused connection the server had dropped (an idle timeout), found before
        # any body went out: one fresh attempt. Never after a body may have gone
        # (a reply that timed out after DATA is a mail the server may have taken).
        pooled = None
        try:
            pooled = self._checked_out(None)
            refused = _send_once(pooled, message, self._permit)
        except Exception as err:
            if pooled is not None:
                pooled.close()
            raise classify(err) from err
        self._put_back(pooled)
        return refused

    def _take(self) -> _Pooled | None:
        """The most recently used idle connection still within MAIL_IDLE_TIMEOUT, or None."""
        idle = self.app.config["MAIL_IDLE_TIMEOUT"]
        stale: list[_Pooled] = []
        taken = None
        with self._lock:
            while self._idle:
                candidate = self._idle.pop()
                if time.monotonic() - candidate.last_used <= idle:
                    taken = candidate
                    break
                stale.append(candidate)
        for pooled in stale:
            pooled.close()
        return taken

    def _checked_out(self, pooled: _Pooled | None) -> _Pooled:
        """`pooled`, or a new connection (its connect bounded by MAIL_TIMEOUT), registered
        as this thread's so that abort() finds it."""
        if pooled is None:
            mail: Mail = self.app.extensions["mail"]
            config = self.app.config
            connection = TimeoutConnection(
                mail, config["MAIL_TIMEOUT"], config.get("MAIL_TLS_CA_FILE")
            )
            connection.host = connection.configure_host()
            pooled = _Pooled(connection)
        with self._lock:
            self._in_use[threading.get_ident()] = pooled
        return pooled

    def _put_back(self, pooled: _Pooled) -> None:
        pooled.last_used = time.monotonic()
        with self._lock:
            self._idle.append(pooled)
            start_sweeper = not self._sweeping
            self._sweeping = True
        if start_sweeper:
            threading.Thread(target=self._sweep, name="mailqueue-smtp-idle", daemon=True).start()

    def _sweep(self) -> None:
        """Close idle connections once MAIL_IDLE_TIMEOUT has passed; end when none is left,
        so a worker with nothing to do holds no connection open for long."""
        idle = self.app.config["MAIL_IDLE_TIMEOUT"]
        while True:
            with self._lock:
                moment = time.monotonic()
                expired = [p for p in self._idle if moment - p.last_used > idle]
                self._idle = [p for p in self._idle if moment - p.last_used <= idle]
                if not self._idle:
                    self._sweeping = False
                oldest = min((p.last_used for p in self._idle), default=moment)
                done = not self._sweeping
            for pooled in expired:
                pooled.close()
            if done:
                return
            time.sleep(min(max(oldest + idle - moment, 0.0) + 0.01, 1.0))

    def abort(self, thread: int) -> bool:
        """Shut down the socket of the connection `thread` is using, so a send blocked on
        it returns at once (a delivery's deadline, app/inflight.py). True if there was one."""
        with self._lock:
            pooled = self._in_use.get(thread)
        host = pooled.connection.host if pooled is not None else None
        sock = host.sock if host is not None else None
        if sock is None:
            return False
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True

    def _permit(self) -> None:
        """Take a fleet-wide send permit (MAIL_MAX_PER_SECOND), if a rate is set."""
        if not self._rate:
            return
        with self._lock:
            if self._limiter is None:
                from app.queues import get_redis

                self._limiter = RateLimiter(get_redis(self.app), self._rate)
            limiter = self._limiter
        limiter.acquire()

    def close(self) -> None:
        """Close the idle connections (those in use close when their send ends); never raise."""
        with self._lock:
            idle, self._idle = self._idle, []
        for pooled in idle:
            pooled.close()


def _body_may_be_sent(pooled: _Pooled | None) -> bool:
    host = pooled.connection.host if pooled is not None else None
    return host is None or getattr(host, "body_may_be_sent", True)


def _send_once(pooled: _Pooled, message: Message, permit: Callable[[], None]) -> dict[str, str]:
    host = pooled.host
    host.body_may_be_sent = False
    recipients = [_envelope(address) for address in message.send_to]
    # Connected, but maybe not greeted yet (no STARTTLS or login): EHLO says what it offers.
    host.ehlo_or_helo_if_needed()
    # Right before the send, after connecting: the permit is spent on a mail,
    # never on a connection attempt that fails.
    permit()
    sender, msg = _envelope(message.sender), message.as_bytes()
    options = message.mail_options, message.rcpt_options
    if host.has_extn("pipelining"):
        refused = _sendmail_pipelined(host, sender, recipients, msg, *options)
    else:
        refused = host.sendmail(sender, recipients, msg, *options)
    return {addr: _reply(code, text) for addr, (code, text) in refused.items()}


_quote_periods: Callable[[bytes], bytes] = smtplib._quote_periods  # type: ignore[attr-defined]


def _sendmail_pipelined(
    host: smtplib.SMTP,
    sender: str,
    recipients: list[str],
    msg: bytes,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
) -> dict[str, tuple[int, bytes]]:
    """`host.sendmail`, but with MAIL, every RCPT and DATA in one write (RFC 2920).

    Each command is otherwise a round trip of its own, ~80 us of CPU at both ends
    here. Same commands, replies, return value and exceptions as sendmail; the
    replies are read in order, and a failed transaction is RSET (or closed after
    a 421, or when the server would take a body we no longer send).
    """
    if any(option.lower() == "smtputf8" for option in mail_options):
        return host.sendmail(sender, recipients, msg, mail_options, rcpt_options)
    options = [f"size={len(msg)}"] if host.has_extn("size") else []
    mail_tail = "".join(" " + option for option in [*options, *mail_options])
    rcpt_tail = "".join(" " + option for option in rcpt_options)
    commands = [f"MAIL FROM:{_quoted(sender)}{mail_tail}"]
    commands += [f"RCPT TO:{_quoted(recipient)}{rcpt_tail}" for recipient in recipients]
    commands.append("DATA")
    if any("\r" in command or "\n" in command for command in commands):
        raise ValueError(f"newline in an SMTP command: {commands!r}")
    host.send("".join(command + "\r\n" for command in commands))
    replies: list[tuple[int, bytes]] = []
    for _ in commands:
        replies.append(host.getreply())
        if replies[-1][0] == 421:  # the server closes the connection: no more replies
            host.close()
            break
    code, text = replies[0]
    refused = {
        address: reply
        for address, reply in zip(recipients, replies[1:], strict=False)
        if reply[0] not in (250, 251)
    }
    error: smtplib.SMTPException
    body_sent = False
    if code != 250:
        error = smtplib.SMTPSenderRefused(code, text, sender)
    elif len(refused) == len(recipients) or len(replies) < len(commands):
        error = smtplib.SMTPRecipientsRefused(refused)
    else:
        code, text = replies[-1]
        if code == 354:
            if isinstance(host, _BodyTracking):
                host.body_may_be_sent = True
            body = _quote_periods(msg)
            host.send(body + (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n"))
            body_sent = True
            code, text = host.getreply()
            if code == 250:
                return refused
        error = smtplib.SMTPDataError(code, text)
    if code == 421 or (replies[-1][0] == 354 and not body_sent):
        host.close()  # closing is the only way to abort a DATA the server has accepted
    elif host.sock is not None:
        # Whatever RSET meets, the transaction's own error is the one to report.
        with contextlib.suppress(smtplib.SMTPException, OSError):
            host.rset()
    raise error


def _dropped(err: BaseException) -> bool:
    """The server had closed the connection: no reply, or its 421 to MAIL FROM (how
    some servers announce an idle timeout before hanging up)."""
    return isinstance(err, smtplib.SMTPServerDisconnected) or (
        isinstance(err, smtplib.SMTPSenderRefused) and err.smtp_code == 421
    )


def _quoted(address: str) -> str:
    """smtplib's quoteaddr, without its parseaddr for the bare addresses we validated."""
    return f"<{address}>" if BARE_ADDRESS.fullmatch(address) else _quoteaddr(address)


@functools.lru_cache(maxsize=256)
def _quoteaddr(address: str) -> str:
    # Mostly the configured sender, the same on every mail.
    return smtplib.quoteaddr(address)


def _envelope(address: str | tuple[str, str]) -> str:
    """What Flask-Mail's sanitize_address gives smtplib for MAIL FROM / RCPT TO; a bare
    address is already that (its RFC 5322 parse was ~10% of a worker's CPU), and the
    sender, the same on every mail, is worked out once."""
    if isinstance(address, str) and BARE_ADDRESS.fullmatch(address):
        return address
    return _sanitized(address)


@functools.lru_cache(maxsize=256)
def _sanitized(address: str | tuple[str, str]) -> str:
    return sanitize_address(address)


def classify(err: BaseException) -> TransientDeliveryError | PermanentDeliveryError:
    """Sort an SMTP or socket failure into retry-later or give-up-now."""
    if isinstance(err, TransientDeliveryError | PermanentDeliveryError):
        return err
    if isinstance(err, smtplib.SMTPRecipientsRefused):
        refused = {addr: _reply(code, text) for addr, (code, text) in err.recipients.items()}
        codes = [code for code, _ in err.recipients.values()]
        summary = "all recipients refused: " + "; ".join(f"{a}: {r}" for a, r in refused.items())
        if codes and all(500 <= code < 600 for code in codes):
            return PermanentDeliveryError(summary, refused)
        return TransientDeliveryError(summary, refused)
    if isinstance(err, smtplib.SMTPResponseException):
        reply = _reply(err.smtp_code, err.smtp_error)
        if 500 <= err.smtp_code < 600:
            return PermanentDeliveryError(f"SMTP server refused: {reply}")
        return TransientDeliveryError(f"SMTP server deferred: {reply}")
    if isinstance(err, JobTimeoutException):
        # RQ's job timeout fired mid-conversation: the server may still answer later.
        return TransientDeliveryError(f"SMTP conversation exceeded the job timeout: {err}")
    if isinstance(err, redis.exceptions.RedisError):
        # The rate limiter could not reach Redis: nothing was sent.
        return TransientDeliveryError(f"rate limiter unavailable: {err}")
    if isinstance(err, socket.timeout | TimeoutError):
        return TransientDeliveryError(f"SMTP timeout: {err or 'no reply in time'}")
    if isinstance(err, smtplib.SMTPServerDisconnected | OSError | smtplib.SMTPException):
        return TransientDeliveryError(f"SMTP connection failed: {type(err).__name__}: {err}")
    return PermanentDeliveryError(f"{type(err).__name__}: {err}")


def _reply(code: int, text: bytes | str) -> str:
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return f"{code} {message}".strip()


def init_app(app: Flask) -> None:
    app.extensions[EXTENSION] = Mailer(app)


def get_mailer(app: Flask | None = None) -> Mailer:
    """This process's Mailer."""
    target: Any = app or current_app
    mailer: Mailer = target.extensions[EXTENSION]
    return mailer
