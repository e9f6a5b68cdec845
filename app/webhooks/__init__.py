"""Provider webhooks: bounces and complaints from Mailgun, SendGrid, SES (through SNS)
and Postmark, onto the suppression list (app.deliverability).

Each provider has a module that authenticates a request its own way and turns its body
into `Event`s; this package holds what they share. A provider's route exists only while
its secret is configured (a 404 otherwise: an endpoint that cannot authenticate must not
accept anything). Every request is checked before anything is written:

1. authenticated (signature, certificate or credentials), else 401;
2. fresh: the provider's timestamp within MAX_AGE_SECONDS of our clock, else 401 (a
   captured request cannot be used later);
3. understood: a body in the provider's format, else 400;
4. new: its token / message id never seen in the last REPLAY_SECONDS, else 409 (a
   captured request cannot be used again within the freshness window). The mark is the
   first write, made only for a request that passed 1-3.

Then each event that means something (a permanent bounce, a complaint) suppresses its
address; the rest are acknowledged and ignored.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request

from app import deliverability
from app.api import error_response
from app.queues import get_redis

log = logging.getLogger("mailqueue.webhooks")

MAX_AGE_SECONDS = 300
REPLAY_SECONDS = 2 * MAX_AGE_SECONDS + 60  # longer than any timestamp we would accept
SEEN_PREFIX = "mq:webhooks:seen:"


class Rejected(Exception):
    """A request refused before any write: answered `status` with `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Event:
    """One bounce or complaint a provider reported."""

    address: str
    reason: str  # suppression.HARD_BOUNCE or COMPLAINT
    detail: str = ""
    message_id: str | None = None  # the mail's Message-ID, when the provider passes it on


def check_fresh(timestamp: float, now: float | None = None) -> None:
    """The provider's clock and ours agree to within MAX_AGE_SECONDS, else Rejected."""
    now = time.time() if now is None else now
    if abs(now - timestamp) > MAX_AGE_SECONDS:
        raise Rejected(401, f"stale: the timestamp is more than {MAX_AGE_SECONDS} s off")


def mark_seen(provider: str, token: str | bytes) -> None:
    """Record `token` (a request's unique part) as used; Rejected 409 if it was already."""
    raw = token.encode() if isinstance(token, str) else token
    key = SEEN_PREFIX + provider + ":" + hashlib.sha256(raw).hexdigest()
    if not get_redis().set(key, b"1", nx=True, ex=REPLAY_SECONDS):
        raise Rejected(409, "replayed: this request was received before")


def apply(source: str, events: Iterable[Event]) -> int:
    """Suppress each event's address (with its side effects); how many."""
    count = 0
    for event in events:
        deliverability.suppress(
            event.address, event.reason, source, event.detail, message_id=event.message_id
        )
        count += 1
    return count


def text(value: Any, limit: int = 500) -> str:
    """A provider's free-text field, as a bounded string (whatever type it came as)."""
    if value is None:
        return ""
    return (value if isinstance(value, str) else str(value))[:limit]


Handler = Callable[[], tuple[str, list[Event]]]


def endpoint(source: str, handler: Handler) -> Callable[[], Response]:
    """A view around `handler` (authenticates, checks, parses; returns what happened and
    the events to apply) that answers Rejected as JSON and applies the events."""

    def view() -> Response:
        try:
            outcome, events = handler()
        except Rejected as err:
            log.warning("webhook %s refused (%s): %s", source, err.status, err.message)
            response = error_response(err.status, err.message)
            if err.status == 401 and source == "postmark":
                response.headers["WWW-Authenticate"] = 'Basic realm="mailqueue webhooks"'
            return response
        applied = apply(source, events)
        return jsonify({"status": outcome, "suppressed": applied})

    view.__name__ = source
    return view


def json_body() -> Any:
    """The raw body as JSON, whatever its Content-Type (SNS sends text/plain)."""
    import json

    try:
        return json.loads(request.get_data(cache=True))
    except (ValueError, RecursionError):
        raise Rejected(400, "the body is not valid JSON") from None


def init_app(app: Flask) -> None:
    """Register the route of each provider whose secret is configured."""
    from app.webhooks import mailgun, postmark, sendgrid, ses

    bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")
    enabled = 0
    for module in (mailgun, sendgrid, ses, postmark):
        if module.configured(app.config):
            module.prepare(app)
            bp.add_url_rule(
                f"/{module.SOURCE}",
                module.SOURCE,
                endpoint(module.SOURCE, module.handle),
                methods=["POST"],
            )
            enabled += 1
    if enabled:
        app.register_blueprint(bp)
