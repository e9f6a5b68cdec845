"""POST /webhooks/mailgun: Mailgun's webhooks (JSON, with a `signature` object).

Authenticity: HMAC-SHA256, keyed with MAILGUN_WEBHOOK_SIGNING_KEY (the account's
"HTTP webhook signing key"), of the signature's `timestamp` followed by its `token`,
compared with its `signature` (hex) in constant time. The token is random per request:
seen before, it is a replay. `failed` with severity `permanent` is a hard bounce;
`complained` a complaint; everything else (temporary failures, deliveries, opens) is
acknowledged and ignored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from flask import Flask, current_app

from app import suppression
from app.webhooks import Event, Rejected, check_fresh, json_body, mark_seen, text

SOURCE = "mailgun"


def configured(config: Mapping[str, Any]) -> bool:
    return bool(config.get("MAILGUN_WEBHOOK_SIGNING_KEY"))


def prepare(app: Flask) -> None:
    """Nothing to load: the key is used as configured."""


def signature(key: str, timestamp: str, token: str) -> str:
    """What Mailgun puts in `signature.signature` (also what a test signs with)."""
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def handle() -> tuple[str, list[Event]]:
    body = json_body()
    signed = body.get("signature") if isinstance(body, dict) else None
    if not isinstance(signed, dict):
        raise Rejected(401, "no signature object")
    parts = [signed.get(k) for k in ("timestamp", "token", "signature")]
    if not all(isinstance(v, str) and v for v in parts):
        raise Rejected(401, "the signature needs timestamp, token and signature")
    timestamp, token, given = (str(v) for v in parts)
    expected = signature(current_app.config["MAILGUN_WEBHOOK_SIGNING_KEY"], timestamp, token)
    if not hmac.compare_digest(expected.encode(), given.lower().encode()):
        raise Rejected(401, "wrong signature")
    try:
        check_fresh(float(timestamp))
    except ValueError:
        raise Rejected(401, "the timestamp is not a number") from None
    events = _events(body.get("event-data"))
    mark_seen(SOURCE, token)
    return "accepted", events


def _events(data: Any) -> list[Event]:
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        raise Rejected(400, "event-data with an event is required")
    kind = data["event"]
    if kind == "failed" and data.get("severity") == "permanent":
        reason = suppression.HARD_BOUNCE
    elif kind == "complained":
        reason = suppression.COMPLAINT
    else:
        return []
    recipient = data.get("recipient")
    if not isinstance(recipient, str) or "@" not in recipient:
        raise Rejected(400, "event-data.recipient must be an address")
    status = data.get("delivery-status")
    status = status if isinstance(status, dict) else {}
    detail = " ".join(
        part
        for part in (
            text(status.get("code")),
            text(status.get("message") or status.get("description")),
        )
        if part
    ) or text(data.get("reason"))
    message = data.get("message")
    headers = message.get("headers") if isinstance(message, dict) else None
    message_id = headers.get("message-id") if isinstance(headers, dict) else None
    return [Event(recipient, reason, detail, text(message_id) or None)]
