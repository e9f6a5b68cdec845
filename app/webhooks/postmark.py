"""POST /webhooks/postmark: Postmark's bounce and spam-complaint webhooks.

Postmark does not sign its webhooks; it sends the HTTP Basic credentials configured on
the webhook's URL, so POSTMARK_WEBHOOK_USER / POSTMARK_WEBHOOK_PASSWORD must match
(constant time). Freshness is the event's own time (`BouncedAt`), replay its record id
(`ID`). `Bounce` with `Type: HardBounce` is a hard bounce; `SpamComplaint` a complaint;
other bounce types (soft, transient, auto-responder) and records are ignored.

Postmark bounce webhooks carry Postmark's MessageID, not ours: a mail's own id is taken
from `Metadata.mail_id` when the sender set it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from flask import Flask, current_app, request

from app import suppression
from app.webhooks import Event, Rejected, check_fresh, json_body, mark_seen, text

SOURCE = "postmark"


def configured(config: Mapping[str, Any]) -> bool:
    return bool(config.get("POSTMARK_WEBHOOK_USER") and config.get("POSTMARK_WEBHOOK_PASSWORD"))


def prepare(app: Flask) -> None:
    """Nothing to load."""


def _authenticated() -> bool:
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    config = current_app.config
    # Both compared, always: no early exit that times which half was wrong.
    ok_user = hmac.compare_digest(user, config["POSTMARK_WEBHOOK_USER"].encode())
    ok_password = hmac.compare_digest(password, config["POSTMARK_WEBHOOK_PASSWORD"].encode())
    return bool(sep) and ok_user and ok_password


def handle() -> tuple[str, list[Event]]:
    if not _authenticated():
        raise Rejected(401, "missing or wrong credentials")
    body = json_body()
    if not isinstance(body, dict) or not isinstance(body.get("RecordType"), str):
        raise Rejected(400, "a Postmark webhook record with a RecordType is required")
    stamp = body.get("BouncedAt") or body.get("ReceivedAt")
    try:
        when = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise Rejected(401, "BouncedAt must be a date-time with a UTC offset")
    check_fresh(when.timestamp())
    record_id = body.get("ID")
    if not isinstance(record_id, int | str) or isinstance(record_id, bool) or record_id == "":
        raise Rejected(400, "ID is required")
    events = _events(body)
    mark_seen(SOURCE, f"{body['RecordType']}:{record_id}")
    return "accepted", events


def _events(body: dict[str, Any]) -> list[Event]:
    kind = body["RecordType"]
    if kind == "Bounce" and body.get("Type") == "HardBounce":
        reason = suppression.HARD_BOUNCE
    elif kind == "SpamComplaint":
        reason = suppression.COMPLAINT
    else:
        return []
    address = body.get("Email")
    if not isinstance(address, str) or "@" not in address:
        raise Rejected(400, "Email must be an address")
    metadata = body.get("Metadata")
    mail_id = metadata.get("mail_id") if isinstance(metadata, dict) else None
    detail = text(body.get("Details") or body.get("Description"))
    message_id = f"<{mail_id}@postmark>" if isinstance(mail_id, str) else None
    return [Event(address, reason, detail, message_id)]
