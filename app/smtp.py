"""SMTP delivery over one reused connection per process, with a timeout.

Flask-Mail opens a connection per `send` and has no timeout (flask-mail #114,
#38). A worker keeps one Flask-Mail `Connection` open, built with a socket
timeout, reconnects once when the server has dropped it, and drops it after
MAIL_IDLE_TIMEOUT idle seconds. SMTP failures are sorted here into transient
(retry) and permanent (fail now), keeping the server's reply. With
MAIL_MAX_PER_SECOND set, every send first takes a fleet-wide permit (app/ratelimit.py).
"""

from __future__ import annotations

import functools
import logging
import smtplib
import socket
import ssl
import threading
import time
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
            host = smtplib.SMTP_SSL(
                self.mail.server, self.mail.port, timeout=self.timeout, context=context
            )
        else:
            host = smtplib.SMTP(self.mail.server, self.mail.port, timeout=self.timeout)
        try:
            if self.mail.use_tls:
                host.starttls(context=context)
            if self.mail.username and self.mail.password:
                host.login(self.mail.username, self.mail.password)
        except BaseException:
            host.close()
            raise
        return host


class Mailer:
    """One process's SMTP connection: opened lazily, reused, closed when idle."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._connection: TimeoutConnection | None = None
        self._last_used = 0.0
        self._lock = threading.Lock()
        self._limiter: RateLimiter | None = None
        self._rate: float | None = app.config.get("MAIL_MAX_PER_SECOND")

    def send(self, message: Message) -> dict[str, str]:
        """Deliver `message`; return the recipients the server refused (code and reply).

        Raises TransientDeliveryError or PermanentDeliveryError.
        """
        with self._lock:
            try:
                return self._send_once(message)
            except smtplib.SMTPServerDisconnected:
                # A reused connection the server had closed: one fresh attempt.
                self.close()
                try:
                    return self._send_once(message)
                except Exception as err:
                    self.close()
                    raise classify(err) from err
            except Exception as err:
                self.close()
                raise classify(err) from err

    def _send_once(self, message: Message) -> dict[str, str]:
        connection = self._open()
        host = connection.host
        assert host is not None
        recipients = [_envelope(address) for address in message.send_to]
        if self._rate:
            # Right before the send, after connecting: the permit is spent on a mail,
            # never on a connection attempt that fails.
            self._rate_limiter().acquire()
        refused = host.sendmail(
            _envelope(message.sender),
            recipients,
            message.as_bytes(),
            message.mail_options,
            message.rcpt_options,
        )
        self._last_used = time.monotonic()
        return {addr: _reply(code, text) for addr, (code, text) in refused.items()}

    def _rate_limiter(self) -> RateLimiter:
        if self._limiter is None:
            from app.queues import get_redis

            assert self._rate is not None
            self._limiter = RateLimiter(get_redis(self.app), self._rate)
        return self._limiter

    def _open(self) -> TimeoutConnection:
        idle = self.app.config["MAIL_IDLE_TIMEOUT"]
        if self._connection is not None and time.monotonic() - self._last_used > idle:
            self.close()
        if self._connection is None:
            mail: Mail = self.app.extensions["mail"]
            config = self.app.config
            connection = TimeoutConnection(
                mail, config["MAIL_TIMEOUT"], config.get("MAIL_TLS_CA_FILE")
            )
            connection.host = connection.configure_host()
            self._connection = connection
            self._last_used = time.monotonic()
        return self._connection

    def close(self) -> None:
        """Quit politely if possible; never raise."""
        connection, self._connection = self._connection, None
        if connection is None or connection.host is None:
            return
        try:
            connection.host.quit()
        except (smtplib.SMTPException, OSError):
            connection.host.close()


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
