"""POST /webhooks/ses: SES bounce and complaint notifications, delivered by Amazon SNS.

On while SES_SNS_TOPIC_ARNS lists the topics SES publishes to; a message from any
other topic is refused before anything else is looked at. Authenticity is SNS's
message signature: RSA over the message's canonical string (its fields as
"Name\\nvalue\\n", a fixed set per message type), SHA1 for SignatureVersion 1, SHA256
for 2, verified with the public key of the X.509 certificate at SigningCertURL. That
URL must be `https://sns.<region>.amazonaws.com/<...>.pem` (or .amazonaws.com.cn):
anything else, and a message naming it is refused without a fetch, since whoever
controls the certificate controls the verdict.

Certificates: fetched once per URL (a few seconds' timeout, a size bound), checked
for their validity dates, and cached in the process (CERTIFICATES). The seam for tests
and for operators who pin certificates is `trust_certificate(url, pem)`: it puts a
certificate in that cache for a URL that passes the same URL check, and verification
then runs unchanged with it. Nothing else is swapped out.

A `SubscriptionConfirmation`, once verified, is logged and kept (CONFIRMATIONS_KEY) for
`flask mail ses-confirmations` to show its SubscribeURL: an operator confirms it. It is
never fetched by the service. Notifications: a `Bounce` with bounceType `Permanent`
suppresses each bounced recipient; a `Complaint` each complained recipient (SES's
notification format and its event-publishing format, `eventType`, alike).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from flask import Flask, current_app

from app import suppression
from app.queues import get_redis
from app.webhooks import Event, Rejected, check_fresh, json_body, mark_seen, text

log = logging.getLogger("mailqueue.webhooks.ses")

SOURCE = "ses"
CONFIRMATIONS_KEY = "mq:ses:confirmations"  # hash: topic ARN -> JSON {subscribe_url, ...}
_HOST = re.compile(r"^sns\.[a-z]{2}(?:-[a-z]+)+-\d\.amazonaws\.com(?:\.cn)?$")
_SIGNED_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
    ),
    "UnsubscribeConfirmation": (
        "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
    ),
}  # fmt: skip
_HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}
FETCH_TIMEOUT = 5.0
MAX_CERT_BYTES = 64 * 1024
CACHE_SIZE = 32

CERTIFICATES: OrderedDict[str, x509.Certificate] = OrderedDict()
_lock = threading.Lock()


def configured(config: Mapping[str, Any]) -> bool:
    return bool(config.get("SES_SNS_TOPIC_ARNS"))


def prepare(app: Flask) -> None:
    """Nothing to load: certificates come per message, and are cached as they do."""


def cert_url_ok(url: str) -> bool:
    """`https://sns.<region>.amazonaws.com/....pem`, no port, user or query."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme == "https"
        and port is None
        and not parts.username
        and bool(_HOST.match(parts.hostname or ""))
        and parts.netloc == parts.hostname
        and parts.path.endswith(".pem")
        and not parts.query
        and not parts.fragment
    )


def trust_certificate(url: str, pem: bytes) -> None:
    """Put the certificate `pem` in the cache as the one at `url` (which must pass
    cert_url_ok): the documented seam for tests, and for pinning a known certificate."""
    if not cert_url_ok(url):
        raise ValueError(f"not an SNS certificate URL: {url}")
    _remember(url, x509.load_pem_x509_certificate(pem))


def _remember(url: str, certificate: x509.Certificate) -> None:
    with _lock:
        CERTIFICATES[url] = certificate
        CERTIFICATES.move_to_end(url)
        while len(CERTIFICATES) > CACHE_SIZE:
            CERTIFICATES.popitem(last=False)


def certificate(url: str) -> x509.Certificate:
    with _lock:
        cached = CERTIFICATES.get(url)
    if cached is not None:
        return cached
    try:  # URL checked by the caller: https to an SNS host only
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as reply:  # noqa: S310
            pem = reply.read(MAX_CERT_BYTES + 1)
        if len(pem) > MAX_CERT_BYTES:
            raise ValueError("certificate too large")
        loaded = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as err:
        log.warning("SNS certificate %s unavailable: %s", url, err)
        raise Rejected(401, "the signing certificate could not be fetched") from None
    _remember(url, loaded)
    return loaded


def canonical(message: Mapping[str, Any]) -> bytes:
    """The string SNS signs: each signed field present, as "Name\\nvalue\\n", in order."""
    fields = _SIGNED_FIELDS[message["Type"]]
    parts = []
    for name in fields:
        value = message.get(name)
        if value is None:
            if name == "Subject":
                continue  # signed only when present
            raise Rejected(400, f"{name} is required")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode()


def verify(message: Mapping[str, Any]) -> None:
    """SNS's signature over `message`, or Rejected 401."""
    version = message.get("SignatureVersion")
    if version not in _HASHES:
        raise Rejected(401, "SignatureVersion must be 1 or 2")
    url = message.get("SigningCertURL")
    if not isinstance(url, str) or not cert_url_ok(url):
        raise Rejected(401, "SigningCertURL must be https://sns.<region>.amazonaws.com/...pem")
    try:
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(401, "Signature is not base64") from None
    if len(signature) < 128:  # RSA-1024 at the least: nothing shorter is worth a fetch
        raise Rejected(401, "Signature is too short")
    cert = certificate(url)
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Rejected(401, "the signing certificate is not valid now")
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise Rejected(401, "the signing certificate has no RSA key")
    try:
        key.verify(signature, canonical(message), padding.PKCS1v15(), _HASHES[version]())
    except InvalidSignature:
        raise Rejected(401, "wrong signature") from None


def handle() -> tuple[str, list[Event]]:
    message = json_body()
    if not isinstance(message, dict) or message.get("Type") not in _SIGNED_FIELDS:
        raise Rejected(400, "not an SNS message")
    if not all(isinstance(message.get(k), str) for k in ("TopicArn", "MessageId", "Timestamp")):
        raise Rejected(400, "TopicArn, MessageId and Timestamp are required")
    if message["TopicArn"] not in current_app.config["SES_SNS_TOPIC_ARNS"]:
        raise Rejected(403, "this topic is not in SES_SNS_TOPIC_ARNS")
    verify(message)
    try:
        sent = datetime.fromisoformat(message["Timestamp"].replace("Z", "+00:00"))
    except ValueError:
        raise Rejected(401, "Timestamp is not a date-time") from None
    if sent.tzinfo is None:
        raise Rejected(401, "Timestamp has no UTC offset")
    check_fresh(sent.timestamp())
    kind = message["Type"]
    events = _events(message["Message"]) if kind == "Notification" else []
    mark_seen(SOURCE, message["MessageId"])
    if kind == "SubscriptionConfirmation":
        _keep_confirmation(message)
        return "subscription confirmation kept for an operator", []
    return "accepted", events


def _keep_confirmation(message: Mapping[str, Any]) -> None:
    url = text(message.get("SubscribeURL"), 2000)
    log.warning(
        "SNS subscription to %s awaits confirmation: run `flask mail ses-confirmations` "
        "and open its SubscribeURL (%s)",
        message["TopicArn"],
        url,
    )
    entry = {"topic": message["TopicArn"], "subscribe_url": url, "at": message["Timestamp"]}
    get_redis().hset(CONFIRMATIONS_KEY, message["TopicArn"], json.dumps(entry))


def confirmations() -> list[dict[str, str]]:
    """The verified SubscriptionConfirmations not yet dealt with, per topic."""
    raw: Any = get_redis().hgetall(CONFIRMATIONS_KEY)
    return [json.loads(value) for _topic, value in sorted(raw.items())]


def _events(raw: Any) -> list[Event]:
    try:
        note = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        note = None
    if not isinstance(note, dict):
        raise Rejected(400, "Message must be an SES notification (JSON)")
    kind = note.get("notificationType") or note.get("eventType")
    message_id = _message_id(_object(note.get("mail")))
    if kind == "Bounce":
        report = _object(note.get("bounce"))
        if report.get("bounceType") != "Permanent":
            return []
        listed, reason = report.get("bouncedRecipients"), suppression.HARD_BOUNCE
    elif kind == "Complaint":
        report = _object(note.get("complaint"))
        listed, reason = report.get("complainedRecipients"), suppression.COMPLAINT
    else:
        return []
    found = []
    for item in listed if isinstance(listed, list) else []:
        address = item.get("emailAddress") if isinstance(item, dict) else None
        if not isinstance(address, str) or "@" not in address:
            continue
        if reason == suppression.HARD_BOUNCE:
            detail = text(item.get("diagnosticCode") or report.get("bounceSubType"))
        else:
            detail = text(report.get("complaintFeedbackType"))
        found.append(Event(address, reason, detail, message_id))
    return found


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _message_id(mail: Mapping[str, Any]) -> str | None:
    """The Message-ID header the mail was sent with (ours), if SES passes it on."""
    common = mail.get("commonHeaders")
    if isinstance(common, dict) and isinstance(common.get("messageId"), str):
        return common["messageId"]
    for header in mail.get("headers") or []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() == "message-id":
            return text(header.get("value")) or None
    return None
