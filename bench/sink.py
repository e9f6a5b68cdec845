"""A minimal SMTP sink for the benchmark: accepts everything, remembers when.

aiosmtpd saturates near 1,800 mails/s on one connection (DESIGN.md), which
would make it the bottleneck being measured. This server is a bare asyncio
Protocol (no StreamReader, no per-command coroutine): it answers the handful
of commands smtplib sends (PIPELINING too, as Postfix and the big providers do:
the replies to what arrived together go out in one write), finds the Message-ID
in the header block of each message and records `time.monotonic()` when it
accepted it (CLOCK_MONOTONIC is system-wide on Linux, so producers in other
processes can compare).

It runs in its own process (`python -m bench.sink PORT CONTROL_PORT`) so its CPU
time is its own. A line protocol on the control port serves the harness:

    STATS  -> {"messages": n, "cpu": seconds, "connections": n}
    DUMP   -> {"<message-id>": [first accepted, times seen], ...}
    RESET  -> forget everything received so far
    LAG ms -> from now on, send every reply (the greeting too) `ms` milliseconds late:
              a provider a round trip away (replies to pipelined commands still go
              out together, in order)
    CHUNKING on|off -> offer CHUNKING (RFC 3030 BDAT, as Postfix and Gmail do) to
              connections greeted from now on; off by default
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time

MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
EHLO_REPLY = b"250-bench-sink\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 SIZE 33554432\r\n"
EHLO_CHUNKING = EHLO_REPLY.replace(b"250 SIZE", b"250-CHUNKING\r\n250 SIZE")
MAX_LINE = 65536


class Stats:
    def __init__(self) -> None:
        self.messages = 0
        self.connections = 0
        self.seen: dict[bytes, list[float | int]] = {}
        self.lag = 0.0  # seconds every reply is held back
        self.chunking = False

    def accept(self, data: bytes) -> None:
        now = time.monotonic()
        self.messages += 1
        head = data.split(b"\r\n\r\n", 1)[0]
        match = MESSAGE_ID.search(head)
        key = match.group(1) if match else b"<none-%d>" % self.messages
        entry = self.seen.get(key)
        if entry is None:
            self.seen[key] = [now, 1]
        else:
            entry[1] += 1


class SMTPSession(asyncio.Protocol):
    """One client connection: command lines, or a DATA body until CRLF.CRLF."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buffer = b""
        self.in_data = False
        self.chunk: tuple[int, bool] | None = None  # (size, last) of the BDAT being read
        self.chunks: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.due = 0.0  # when the latest held-back reply goes out (keeps them in order)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.connections += 1
        self.reply(b"220 bench-sink ESMTP\r\n", close=False)

    def reply(self, data: bytes, close: bool) -> None:
        """Write `data` (then close), now or `stats.lag` seconds from now."""
        if self.stats.lag <= 0:
            self._write(data, close)
            return
        loop = asyncio.get_running_loop()
        self.due = max(loop.time() + self.stats.lag, self.due + 1e-6)
        loop.call_at(self.due, self._write_late, data, close)

    def _write(self, data: bytes, close: bool) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(data)
        if close:
            transport.close()

    def _write_late(self, data: bytes, close: bool) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._write(data, close)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        transport = self.transport
        assert transport is not None
        replies: list[bytes] = []
        close = False
        while True:
            if self.chunk is not None:
                size, last = self.chunk
                if len(self.buffer) < size:
                    break
                self.chunks.append(self.buffer[:size])
                self.buffer, self.chunk = self.buffer[size:], None
                if last:
                    self.stats.accept(b"".join(self.chunks))
                    self.chunks = []
                replies.append(b"250 2.0.0 OK\r\n")
                continue
            if self.in_data:
                # The body starts right after DATA's CRLF (in this packet or a later one)
                # and ends with "\r\n.\r\n"; ".\r\n" right away is an empty body.
                if self.buffer.startswith(b".\r\n"):
                    end, body = 3, b""
                else:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    body, end = self.buffer[:end], end + 5
                self.buffer = self.buffer[end:]
                self.in_data = False
                self.stats.accept(body)
                replies.append(b"250 2.0.0 OK\r\n")
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                if len(self.buffer) > MAX_LINE:
                    replies.append(b"500 line too long\r\n")
                    close = True
                break
            line, self.buffer = self.buffer[:line_end], self.buffer[line_end + 2 :]
            verb = line[:4].upper()
            if verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                replies.append(b"250 OK\r\n")
            elif verb == b"DATA":
                self.in_data = True
                replies.append(b"354 go ahead\r\n")
            elif verb == b"BDAT" and self.stats.chunking:
                words = line.split()
                self.chunk = (int(words[1]), len(words) > 2 and words[2].upper() == b"LAST")
            elif verb == b"EHLO":
                replies.append(EHLO_CHUNKING if self.stats.chunking else EHLO_REPLY)
            elif verb == b"HELO":
                replies.append(b"250 bench-sink\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 bye\r\n")
                close = True
                break
            else:
                replies.append(b"502 not implemented\r\n")
        self.reply(b"".join(replies), close)


class Control(asyncio.Protocol):
    """STATS / DUMP / SEEN <Message-ID> / LAG ms / RESET: one command a line, one JSON line back."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        assert self.transport is not None
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            command = line.strip().upper()
            reply: object
            if command == b"STATS":
                reply = {
                    "messages": self.stats.messages,
                    "cpu": time.process_time(),
                    "connections": self.stats.connections,
                }
            elif command == b"DUMP":
                reply = {k.decode(): v for k, v in self.stats.seen.items()}
            elif command.startswith(b"SEEN "):
                reply = self.stats.seen.get(line.strip()[5:])  # [accepted, times] or null
            elif command.startswith(b"LAG "):
                self.stats.lag = float(command[4:]) / 1000
                reply = {"lag_ms": self.stats.lag * 1000}
            elif command.startswith(b"CHUNKING "):
                self.stats.chunking = command.endswith(b" ON")
                reply = {"chunking": self.stats.chunking}
            elif command == b"RESET":
                fresh = Stats()
                self.stats.messages, self.stats.seen = fresh.messages, fresh.seen
                self.stats.connections = 0
                reply = {"ok": True}
            else:
                reply = {"error": "unknown command"}
            self.transport.write(json.dumps(reply).encode() + b"\n")


async def serve(port: int, control_port: int) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    smtp = await loop.create_server(
        lambda: SMTPSession(stats), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    control = await loop.create_server(lambda: Control(stats), "127.0.0.1", control_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    smtp.close()
    control.close()


def main() -> None:
    port, control_port = int(sys.argv[1]), int(sys.argv[2])
    asyncio.run(serve(port, control_port))


if __name__ == "__main__":
    main()
