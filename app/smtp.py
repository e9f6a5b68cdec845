"""SMTP delivery over reused connections, up to MAIL_CONCURRENCY per process, with timeouts.

Flask-Mail opens a connection per `send` and has no timeout (flask-mail #114,
#38). A worker keeps a small pool of Flask-Mail `Connection`s, each built with a
socket timeout and carrying one mail at a time: as many as it has mails in
flight (app/inflight.py), never more than MAIL_CONCURRENCY. A reused connection
saves the connect, greeting, EHLO, STARTTLS and AUTH round trips of a new one; a
connection the server has dropped is reopened once; one idle for
MAIL_IDLE_TIMEOUT seconds is closed by a sweeper thread. A server that offers
PIPELINING gets each mail in two round trips instead of 3 + one per recipient,
one that offers CHUNKING as well in one.
SMTP failures are sorted here into transient (retry) and permanent (fail now),
keeping the server's reply. With MAIL_MAX_PER_SECOND set, every send first takes
a fleet-wide permit (app/ratelimit.py).
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import redis.exceptions
from flask import Flask, current_app
from flask_mail import Connection, Mail, Message
from rq.timeouts import JobTimeoutException

from app.errors import PermanentDeliveryError, TransientDeliveryError
from app.ratelimit import RateLimiter
from app.smtpwire import TrackingSMTP, TrackingSMTP_SSL, envelope_address, sendmail_pipelined

log = logging.getLogger("mailqueue.smtp")

EXTENSION = "mailqueue.smtp"


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
            host = TrackingSMTP_SSL(
                self.mail.server, self.mail.port, timeout=self.timeout, context=context
            )
        else:
            host = TrackingSMTP(self.mail.server, self.mail.port, timeout=self.timeout)
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
    def host(self) -> TrackingSMTP | TrackingSMTP_SSL:
        host = self.connection.host
        assert isinstance(host, TrackingSMTP | TrackingSMTP_SSL)
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
        self._announced = False  # the server's offer logged (_announce)
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
            if not self._announced:
                self._announce(pooled.host)
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

    def _announce(self, host: smtplib.SMTP) -> None:
        """Say once a process what the server offers: it sets the round trips a mail."""
        self._announced = True
        offered = [name for name in ("pipelining", "chunking") if host.has_extn(name)]
        trips = {2: "1 round trip", 1: "2 round trips"}.get(len(offered), "3+ round trips")
        if offered == ["chunking"]:
            trips = "3+ round trips"  # BDAT is sent in one write only with PIPELINING
        log.info(
            "SMTP server %s:%s offers %s: %s a mail on a reused connection",
            self.app.config["MAIL_SERVER"],
            self.app.config["MAIL_PORT"],
            " and ".join(name.upper() for name in offered) or "neither PIPELINING nor CHUNKING",
            trips,
        )

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
    recipients = [envelope_address(address) for address in message.send_to]
    # Connected, but maybe not greeted yet (no STARTTLS or login): EHLO says what it offers.
    host.ehlo_or_helo_if_needed()
    # Right before the send, after connecting: the permit is spent on a mail,
    # never on a connection attempt that fails.
    permit()
    sender, msg = envelope_address(message.sender), message.as_bytes()
    options = message.mail_options, message.rcpt_options
    if host.has_extn("pipelining"):
        refused = sendmail_pipelined(host, sender, recipients, msg, *options)
    else:
        refused = host.sendmail(sender, recipients, msg, *options)
    return {addr: _reply(code, text) for addr, (code, text) in refused.items()}


def _dropped(err: BaseException) -> bool:
    """The server had closed the connection: no reply, or its 421 to MAIL FROM (how
    some servers announce an idle timeout before hanging up)."""
    return isinstance(err, smtplib.SMTPServerDisconnected) or (
        isinstance(err, smtplib.SMTPSenderRefused) and err.smtp_code == 421
    )


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
