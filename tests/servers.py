"""Real servers for the tests: a throw-away redis-server and a recording SMTP server."""

from __future__ import annotations

import asyncio
import email
import email.policy
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(interval)


class RedisServer:
    """A private redis-server on a free port, in its own directory."""

    def __init__(self, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server not found on PATH: install it (apt-get install redis-server)"
            )
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="mq-redis-"))
        self.port = free_port()
        self.appendonly = appendonly
        self.extra_args: list[str] = []  # e.g. --replicaof (tests/sentinels.py)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always", *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self._answers, timeout=10):
            raise RuntimeError(f"redis-server did not start on port {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop(kill=True)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Received:
    """One message as the SMTP server received it."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage = field(repr=False)
    authenticated_as: str | None = None
    tls: bool = False
    received_at: float = field(default_factory=time.time)  # when DATA completed

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])

    def part(self, content_type: str) -> str:
        for part in self.message.walk():
            if part.get_content_type() == content_type:
                payload: str = part.get_content()
                return payload
        raise KeyError(content_type)


class RecordingHandler:
    """Records every accepted message; `reply` makes it answer DATA with a code instead.

    It offers PIPELINING, as the big providers and Postfix do (aiosmtpd reads commands
    in order from a stream, so pipelined ones are answered correctly); `pipelining =
    False` for a server without it. `chunking = True` adds CHUNKING (RFC 3030, BDAT),
    which Postfix and Gmail offer and aiosmtpd lacks (`_SMTP.smtp_BDAT`).
    """

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.rejected: list[Received] = []  # what DATA answered with `reply`/`replies`
        self.cond = threading.Condition()
        self.reply: str | None = None  # e.g. "451 4.3.0 try later" or "550 5.1.1 no such user"
        self.replies: list[str] = []  # one-shot replies to the next DATA commands, in order
        self.refuse_rcpt: dict[str, str] = {}  # address -> reply for RCPT TO
        self.hang_seconds = 0.0
        self.reply_delay = 0.0  # every MAIL, RCPT and end-of-DATA reply this late (a far server)
        self.pipelining = True
        self.chunking = False
        self.refuse_mail: str | None = None  # reply to MAIL FROM instead of 250
        self.mail_replies: list[str] = []  # one-shot replies to the next MAIL FROMs, in order
        self.data_command_reply: str | None = None  # reply to the DATA command instead of 354
        self.connections: list[SMTP] = []  # one per EHLO

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does when there is no hook
        self.connections.append(server)
        extensions = ["250-PIPELINING"] if self.pipelining else []
        extensions += ["250-CHUNKING"] if self.chunking else []
        return [*responses[:-1], *extensions, responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        await self._lag()
        if self.mail_replies:
            return self.mail_replies.pop(0)
        if self.refuse_mail:
            return self.refuse_mail
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        await self._lag()
        reply = self.refuse_rcpt.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def _lag(self) -> None:
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        await self._lag()
        if self.hang_seconds:
            await asyncio.sleep(self.hang_seconds)
        raw = envelope.original_content or envelope.content or b""
        assert isinstance(raw, bytes)
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        login = (
            session.auth_data.login.decode()
            if session.authenticated and session.auth_data
            else None
        )
        received = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            raw=raw,
            message=parsed,
            authenticated_as=login,
            tls=session.ssl is not None,
        )
        reply = self.replies.pop(0) if self.replies else self.reply
        with self.cond:
            if reply:
                self.rejected.append(received)
            else:
                self.messages.append(received)
            self.cond.notify_all()
        return reply or "250 2.0.0 OK queued"

    def reset(self) -> None:
        with self.cond:
            self.messages.clear()
            self.rejected.clear()
        self.reply = None
        self.replies = []
        self.refuse_rcpt = {}
        self.hang_seconds = 0.0
        self.reply_delay = 0.0
        self.pipelining = True
        self.chunking = False
        self.refuse_mail = None
        self.mail_replies = []
        self.data_command_reply = None
        self.connections = []

    def drop_connections(self) -> None:
        """Close every client connection from the server's side, as an idle timeout does."""
        for server in self.connections:
            if server.transport is not None:
                server.loop.call_soon_threadsafe(server.transport.close)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least `count` messages arrived (or timeout); return them all."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.messages) >= count, timeout=timeout)
            return list(self.messages)


class _SMTP(SMTP):
    """aiosmtpd's server, with RecordingHandler.data_command_reply (no hook runs before 354)
    and BDAT when the handler offers CHUNKING."""

    _chunks: list[bytes]

    async def smtp_BDAT(self, arg: str) -> None:
        """RFC 3030: read `size` bytes whatever the reply (they are not commands), keep
        them until LAST, then run the DATA hook on the whole message."""
        words = arg.split()
        if not self.event_handler.chunking or not words or not words[0].isdigit():
            await self.push("500 5.5.1 Error: command not recognized")
            return
        chunk = await self._reader.readexactly(int(words[0]))
        last = len(words) == 2 and words[1].upper() == "LAST"
        if self.envelope is None or not self.envelope.rcpt_tos or len(words) > 1 + last:
            self._chunks = []
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        reply = self.event_handler.data_command_reply
        if reply:
            self._chunks = []
            await self.push(reply)
            return
        self._chunks = [*getattr(self, "_chunks", []), chunk]
        if not last:
            await self.push(f"250 2.0.0 {len(chunk)} octets received")
            return
        content = b"".join(self._chunks)
        self._chunks = []
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def smtp_DATA(self, arg: str) -> None:
        reply = self.event_handler.data_command_reply
        if reply and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push(reply)
            return
        await super().smtp_DATA(arg)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _SMTP(self.handler, **self.SMTP_kwargs)


class SMTPServer:
    """aiosmtpd on a free port; optionally STARTTLS with a trustme certificate and AUTH."""

    def __init__(
        self, tls_context: ssl.SSLContext | None = None, users: dict[str, str] | None = None
    ):
        self.handler = RecordingHandler()
        self.port = free_port()
        self.users = users or {}
        kwargs: dict[str, Any] = {}
        if tls_context is not None:
            kwargs.update(tls_context=tls_context, require_starttls=True)
        if users:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=True)
        self.controller = _Controller(
            self.handler, hostname="127.0.0.1", port=self.port, ready_timeout=10, **kwargs
        )

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            login, password = data.login.decode(), data.password.decode()
            if self.users.get(login) == password:
                return AuthResult(success=True, auth_data=data)
        return AuthResult(success=False, handled=False)

    def start(self) -> SMTPServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def messages(self) -> list[Received]:
        with self.handler.cond:
            return list(self.handler.messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        return self.handler.wait_for(count, timeout)
