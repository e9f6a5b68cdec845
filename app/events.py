"""Structured log lines for every state change of a mail, on the `mailqueue.events` logger.

One line per change, logfmt (`event=sent mail_id=... job_id=... template=... attempt=1`),
so `grep mail_id=<id>` follows one mail through web and worker logs, and a log
pipeline can parse the fields (they are also attached to the record as
`record.mail_event` for a JSON formatter). Only identifiers, counts and
redacted reasons go out: never the body, the template context, the recipients'
addresses, credentials or tokens.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from flask import Flask

log = logging.getLogger("mailqueue.events")

QUEUED = "queued"
SCHEDULED = "scheduled"
SENDING = "sending"
SENT = "sent"
RETRY_SCHEDULED = "retry_scheduled"
FAILED = "failed"
SKIPPED = "skipped"

_LEVELS = {RETRY_SCHEDULED: logging.WARNING, FAILED: logging.ERROR}
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # written as a field name
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+-]+$")
# SMTP replies name the refused recipients; keep the domain, hide the mailbox.
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
MAX_REASON = 300


def emit(
    event: str,
    *,
    mail_id: str,
    template: str,
    attempt: int,
    job_id: str | None = None,
    **extra: Any,
) -> None:
    """Log one state change. `extra` holds further identifiers or counts (never content)."""
    fields: dict[str, Any] = {
        "event": event,
        "mail_id": mail_id,
        "job_id": job_id or mail_id,
        "template": template,
        "attempt": attempt,
    }
    fields.update((name, value) for name, value in extra.items() if value not in (None, ""))
    if "reason" in fields:
        fields["reason"] = redact(str(fields["reason"]))
    level = _LEVELS.get(event, logging.INFO)
    if not log.isEnabledFor(level):
        return
    # What log.log(level, ...) does, minus its stack walk (findCaller, a fifth of a
    # line's cost, several lines per mail): the caller it would find is this line.
    record = log.makeRecord(
        log.name,
        level,
        __file__,
        sys._getframe().f_lineno,
        format_fields(fields),
        (),
        None,
        "emit",
        {"mail_event": fields},
    )
    log.handle(record)


def labels(tags: list[str], metadata: dict[str, str]) -> dict[str, str]:
    """A mail's tags and metadata as event fields: `tags=a,b meta.<key>=<value>`. The
    caller chose them to follow its mails through the logs; they are not content."""
    fields = {"tags": ",".join(tags)} if tags else {}
    fields.update((f"meta.{k}", v) for k, v in metadata.items() if _METADATA_KEY.fullmatch(k))
    return fields


def format_fields(fields: dict[str, Any]) -> str:
    """logfmt: bare values where safe, double-quoted (JSON escapes) otherwise."""
    parts = []
    for name, value in fields.items():
        text = str(value)
        if not _BARE.match(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
            text = text.replace("\n", "\\n").replace("\r", "\\r")
        parts.append(f"{name}={text}")
    return " ".join(parts)


def redact(reason: str) -> str:
    """A failure reason fit for a log: addresses masked to their domain, bounded length."""
    masked = _ADDRESS.sub(lambda m: f"***@{m.group(1)}", reason)
    return masked if len(masked) <= MAX_REASON else masked[: MAX_REASON - 1] + "…"


def init_app(app: Flask) -> None:
    """Send mailqueue's log lines to stderr when nothing else configured logging.

    `rq worker` and gunicorn configure only their own loggers, so without this the
    INFO events of every mail would go nowhere in production.
    """
    logger = logging.getLogger("mailqueue")
    logger.setLevel(app.config["LOG_LEVEL"])
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
