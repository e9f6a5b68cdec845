"""A development SMTP sink: accepts every message on 127.0.0.1 and keeps it as an `.eml` file.

Each file holds the message exactly as the worker sent it (CRLF line endings),
named `<UTC time>-<random>.eml` so they sort by arrival.

The dev stack (`python -m app.devstack`) runs it when MAIL_SERVER is not set,
so a fresh checkout delivers mail somewhere you can open. Nothing is relayed.
Alone: `python -m app.devsink --port 1025 --outbox .local/outbox`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import uuid
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope

log = logging.getLogger("mailqueue.devsink")

# Only ever on the loopback interface: it accepts anything from anyone who can connect.
HOST = "127.0.0.1"


class OutboxHandler:
    """aiosmtpd handler: store each message, log one line about it."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        outbox.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode()
        path = self.store(data)
        headers = BytesHeaderParser(policy=default_policy).parsebytes(data)
        log.info(
            "from=%s to=%s subject=%r file=%s",
            envelope.mail_from,
            ",".join(envelope.rcpt_tos),
            str(headers.get("Subject", "")),
            path,
        )
        return "250 2.0.0 OK stored"

    def store(self, data: bytes) -> Path:
        """Write atomically (a reader never sees half a message); names sort by arrival."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
        path = self.outbox / f"{stamp}-{uuid.uuid4().hex[:8]}.eml"
        partial = path.with_name("." + path.name + ".part")
        partial.write_bytes(data)
        os.replace(partial, path)
        return path


def make_controller(outbox: Path, port: int) -> Controller:
    """An (unstarted) aiosmtpd server on 127.0.0.1:`port` storing into `outbox`."""
    return Controller(OutboxHandler(outbox.resolve()), hostname=HOST, port=port, ready_timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.devsink", description=__doc__)
    parser.add_argument("--port", type=int, default=1025, help="port on 127.0.0.1")
    parser.add_argument("--outbox", type=Path, default=Path(".local/outbox"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s mail-sink | %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command
    controller = make_controller(args.outbox, args.port)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    controller.start()
    log.info("listening on %s:%d, storing messages in %s", HOST, args.port, args.outbox.resolve())
    try:
        stop.wait()
    finally:
        controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
