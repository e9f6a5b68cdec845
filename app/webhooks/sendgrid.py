"""POST /webhooks/sendgrid: SendGrid's signed Event Webhook (a JSON array of events).

Authenticity: SENDGRID_WEBHOOK_PUBLIC_KEY is the base64 (DER SubjectPublicKeyInfo)
ECDSA P-256 verification key SendGrid shows for a signed Event Webhook;
`X-Twilio-Email-Event-Webhook-Signature` (base64 DER) must verify, with SHA-256, over
`X-Twilio-Email-Event-Webhook-Timestamp` followed by the raw body, byte for byte.
Replays are recognised by what was signed (timestamp + body), not by the signature: an
ECDSA signature can be re-encoded into another valid one for the same message.

`bounce` events of type `bounce` are hard bounces, `spamreport` complaints; `blocked`
bounces, `deferred`, `dropped` and engagement events are ignored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from flask import Flask, current_app, request

from app import suppression
from app.errors import ConfigError
from app.webhooks import Event, Rejected, check_fresh, json_body, mark_seen, text

SOURCE = "sendgrid"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
_KEY = "mailqueue.sendgrid_key"
MAX_EVENTS = 1000  # SendGrid batches; a bound on what one request may make us write


def configured(config: Mapping[str, Any]) -> bool:
    return bool(config.get("SENDGRID_WEBHOOK_PUBLIC_KEY"))


def load_key(encoded: str) -> ec.EllipticCurvePublicKey:
    """The verification key as SendGrid shows it; ConfigError unless a P-256 key."""
    try:
        key = load_der_public_key(base64.b64decode(encoded.strip(), validate=True))
    except (binascii.Error, ValueError) as err:
        raise ConfigError(f"SENDGRID_WEBHOOK_PUBLIC_KEY: not a base64 public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigError("SENDGRID_WEBHOOK_PUBLIC_KEY: expected an ECDSA P-256 public key")
    return key


def prepare(app: Flask) -> None:
    """Parse the key once, at start-up (a bad one stops start-up, naming the key)."""
    app.extensions[_KEY] = load_key(app.config["SENDGRID_WEBHOOK_PUBLIC_KEY"])


def handle() -> tuple[str, list[Event]]:
    given, timestamp = request.headers.get(SIGNATURE_HEADER), request.headers.get(TIMESTAMP_HEADER)
    if not given or not timestamp:
        raise Rejected(401, f"{SIGNATURE_HEADER} and {TIMESTAMP_HEADER} are required")
    raw = request.get_data(cache=True)
    signed = timestamp.encode() + raw
    key: ec.EllipticCurvePublicKey = current_app.extensions[_KEY]
    try:
        key.verify(base64.b64decode(given, validate=True), signed, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        raise Rejected(401, "wrong signature") from None
    try:
        check_fresh(float(timestamp))
    except ValueError:
        raise Rejected(401, "the timestamp is not a number") from None
    events = _events(json_body())
    mark_seen(SOURCE, hashlib.sha256(signed).digest())
    return "accepted", events


def _events(body: Any) -> list[Event]:
    if not isinstance(body, list) or len(body) > MAX_EVENTS:
        raise Rejected(400, f"expected a JSON array of at most {MAX_EVENTS} events")
    found = []
    for item in body:
        if not isinstance(item, dict):
            raise Rejected(400, "each event must be an object")
        kind = item.get("event")
        if kind == "bounce" and item.get("type", "bounce") == "bounce":
            reason = suppression.HARD_BOUNCE
        elif kind == "spamreport":
            reason = suppression.COMPLAINT
        else:
            continue
        address = item.get("email")
        if not isinstance(address, str) or "@" not in address:
            raise Rejected(400, "a bounce or spamreport event needs its email")
        detail = " ".join(p for p in (text(item.get("status")), text(item.get("reason"))) if p)
        found.append(Event(address, reason, detail, text(item.get("smtp-id")) or None))
    return found
