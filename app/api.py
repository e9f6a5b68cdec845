"""HTTP: the JSON API under /api (bearer token) and /healthz.

Every bad input answers 4xx JSON `{"error": "...", "field": "..."}`; an
unreachable Redis answers 503; nothing answers a bare 500 page.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import redis.exceptions
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from rq import Worker
from werkzeug.exceptions import BadRequest, HTTPException
from werkzeug.routing import BaseConverter

from app import digests, maillog, status
from app.digests.periods import _zone_names as zone_names
from app.errors import (
    IdempotencyConflictError,
    InvalidMailError,
    QueueUnavailableError,
    SubscriberNotFoundError,
)
from app.mail import enqueue, prepare
from app.mail.shape import locales
from app.queues import DEFAULT_PRIORITY, QUEUE_NAMES, SIZE_NAMES, get_queue, get_redis, queue_sizes

log = logging.getLogger("mailqueue.api")

bp = Blueprint("api", __name__, url_prefix="/api")
health = Blueprint("health", __name__)

MAIL_ID = re.compile(r"^[0-9a-f]{32}$")
OPENAPI_PATH = Path(__file__).with_name("openapi.json")


class AddressConverter(BaseConverter):
    """A subscriber address in a URL path: one or more segments ('/' is valid in a
    local part, sent as %2F and decoded before routing), any character at all, so a
    hostile one reaches validation and gets its 400 naming the field, never a 404.
    Not one ending in `/items` (no address does: it would have no domain), so that
    path is only ever the items resource (another method: 405, `Allow: POST`)."""

    regex = r"[^/][\s\S]*?(?<!/items)"
    part_isolating = False


class ApiError(Exception):
    """An error answered as JSON; `field` names the offending input."""

    def __init__(self, status_code: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.field = field


def error_response(status_code: int, message: str, field: str | None = None) -> Response:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    response = jsonify(body)
    response.status_code = status_code
    return response


@bp.before_request
def require_token() -> Response | None:
    """`Authorization: Bearer $API_TOKEN`, compared in constant time; never logged.

    Also guards /metrics (app.metrics)."""
    if request.endpoint == "api.openapi":
        return None  # the API's description is public
    if not current_app.config.get("API_TOKEN"):
        return error_response(401, "the API is disabled: set API_TOKEN")
    if not token_matches(bearer_token()):
        return error_response(401, "missing or wrong bearer token")
    return None


def bearer_token() -> str:
    """The token of this request's `Authorization: Bearer ...` header, or ""."""
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    return supplied.strip() if scheme.lower() == "bearer" else ""


def token_matches(supplied: str) -> bool:
    """`supplied` is API_TOKEN (constant-time); always false while API_TOKEN is unset."""
    expected = current_app.config.get("API_TOKEN") or ""
    return bool(expected) and hmac.compare_digest(supplied.encode(), expected.encode())


def json_body() -> dict[str, Any]:
    """The request's JSON object, or an ApiError saying what is wrong with it."""
    if not request.is_json:
        raise ApiError(415, "expected Content-Type: application/json")
    raw = request.get_data(cache=True)  # 413 above MAX_CONTENT_LENGTH (Content-Length given)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(raw) >= limit:
        # A chunked body is cut at the limit by Werkzeug, not refused: refuse it here.
        raise ApiError(413, f"the body is larger than {limit} bytes")
    try:
        data = request.get_json()
    except BadRequest:
        raise ApiError(400, "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def field(
    data: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True
) -> Any:
    """One field of a JSON object, type-checked."""
    if name not in data or data[name] is None:
        if required:
            raise ApiError(400, f"{name} is required", name)
        return None
    value = data[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        expected = " or ".join(dict.fromkeys(_JSON_NAMES[t] for t in _as_tuple(kind)))
        raise ApiError(400, f"{name} must be {expected}", name)
    return value


# What a JSON client calls each type.
_JSON_NAMES = {
    str: "a string",
    list: "an array",
    dict: "an object",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


# RFC 3339's date-time, what the schema says (OpenAPI `format: date-time`); the offset is
# checked later, with its own message. Python's fromisoformat alone takes far more.
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})?")


def parse_datetime(name: str, value: str) -> datetime:
    try:
        if not RFC3339.fullmatch(value.upper()):
            raise ValueError(value)
        return datetime.fromisoformat(value.upper())
    except ValueError:
        raise ApiError(
            400, f"{name} must be an ISO 8601 (RFC 3339) date-time with a UTC offset", name
        ) from None


MAIL_FIELDS = {"to", "subject", "template", "context", "send_at", "delay", "headers", "priority"}
# Passed to prepare() as they come: it checks each (app.mail.shape, app.mail.attachments).
SHAPE_FIELDS = {"cc", "bcc", "reply_to", "attachments", "tags", "metadata", "locale"}
SUBSCRIBER_FIELDS = {"timezone", "frequency", "hour", "weekday", "locale"}
ITEM_FIELDS = {"title", "url", "body", "kind"}


def refuse_unknown(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]}", unknown[0])


@bp.post("/mail")
def post_mail() -> tuple[Response, int]:
    data = json_body()
    refuse_unknown(data, MAIL_FIELDS | SHAPE_FIELDS)
    to = field(data, "to", (str, list))
    subject = field(data, "subject", str)
    template = field(data, "template", str)
    context = field(data, "context", dict, required=False) or {}
    send_at_raw = field(data, "send_at", str, required=False)
    delay = field(data, "delay", (int, float), required=False)
    send_at = parse_datetime("send_at", send_at_raw) if send_at_raw is not None else None
    priority = field(data, "priority", str, required=False)
    priority = DEFAULT_PRIORITY if priority is None else priority
    shape = {name: data[name] for name in SHAPE_FIELDS if data.get(name) is not None}
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        shape["idempotency_key"] = key
    record = prepare(
        to,
        subject,
        template,
        context,
        send_at=send_at,
        delay=delay,
        headers=field(data, "headers", dict, required=False),
        priority=priority,
        **shape,
    )
    enqueue([record])
    if record.replayed:
        # The mail of this key's first request, as it is now (or as it was queued).
        original = status.load(get_redis(), record.id)
        response = jsonify({"id": record.id, "status": original.status if original else "queued"})
        response.headers["Idempotent-Replayed"] = "true"
        return response, 202
    return jsonify({"id": record.id, "status": record.status}), 202


@bp.get("/mail/<mail_id>")
def get_mail(mail_id: str) -> Response:
    record = status.load(get_redis(), mail_id) if MAIL_ID.match(mail_id) else None
    if record is None:
        raise ApiError(404, f"no mail {mail_id[:64]}")
    view = record.public()
    provider_events = maillog.events(get_redis(), mail_id)  # bounces, complaints
    if provider_events:
        view["events"] = provider_events
    return jsonify(view)


@bp.put("/subscribers/<address:email>")
def put_subscriber(email: str) -> tuple[Response, int]:
    """Create (201) or replace (200) a digest subscriber. PUT replaces: an omitted
    hour or weekday goes back to its default. `weekday` is accepted (and kept) for
    daily subscribers too; it only matters once they are weekly."""
    data = json_body()
    refuse_unknown(data, SUBSCRIBER_FIELDS)
    timezone = field(data, "timezone", str)
    frequency = field(data, "frequency", str)
    hour = field(data, "hour", int, required=False)
    weekday = field(data, "weekday", str, required=False)
    locale = field(data, "locale", str, required=False)
    created = digests.upsert_subscriber(
        email,
        timezone,
        frequency,
        digests.DEFAULT_HOUR if hour is None else hour,
        weekday or digests.DEFAULT_WEEKDAY,
        locale=locale or "",
    )
    return jsonify(digests.describe_subscriber(email)), 201 if created else 200


@bp.get("/subscribers/<address:email>")
def get_subscriber(email: str) -> Response:
    return jsonify(digests.describe_subscriber(email))


@bp.delete("/subscribers/<address:email>")
def delete_subscriber(email: str) -> tuple[str, int]:
    if not digests.delete_subscriber(email):
        raise SubscriberNotFoundError(digests.normalize_email(email))
    return "", 204


@bp.post("/subscribers/<address:email>/items")
def post_item(email: str) -> tuple[Response, int]:
    """Queue one item for the subscriber's next digest (discarded while they are off)."""
    data = json_body()
    refuse_unknown(data, ITEM_FIELDS)
    title = field(data, "title", str)
    url = field(data, "url", str, required=False)
    body = field(data, "body", str, required=False)
    kind = field(data, "kind", str, required=False)
    pending = digests.add_item(email, title, url=url, body=body, kind=kind)
    if pending is None:
        return jsonify({"status": "discarded", "reason": "the subscriber's frequency is off"}), 202
    return jsonify({"status": "queued", "pending_items": pending}), 202


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 description of every route (app/openapi.json, kept by hand), with
    this server's time zones and mail templates as the enums of those fields."""
    doc = json.loads(OPENAPI_PATH.read_bytes())
    timezone = doc["components"]["schemas"]["Subscriber"]["properties"]["timezone"]
    timezone["enum"] = sorted(zone_names())
    new_mail = doc["components"]["schemas"]["NewMail"]["properties"]
    new_mail["template"]["enum"] = mail_templates()
    new_mail["locale"]["enum"] = [*sorted(locales()), None]
    subscriber = doc["components"]["schemas"]["Subscriber"]["properties"]
    subscriber["locale"]["enum"] = [*sorted(locales()), None]
    new_mail["send_at"]["pattern"] = send_at_pattern(datetime.now(UTC).date())
    return jsonify(doc)


def send_at_pattern(today: date) -> str:
    """ "At most a year ahead" as a schema can say it: a date from year 1000 to 365 days
    after `today` (a day inside the API's 366, for the offsets), as a regex on the
    `YYYY-MM-DD` start. December's clients may ask for January."""
    last = today + timedelta(days=365)
    year, month, day = f"{last.year:04d}", f"{last.month:02d}", f"{last.day:02d}"
    # Earlier years, 1000 on: _below's first alternative (a lower first digit) from 1.
    years = [a for a in _below(year) if a[0] == year[0]]
    if year[0] > "1":
        years.insert(0, f"[1-{int(year[0]) - 1}]\\d\\d\\d")
    options = [f"(?:{'|'.join(years)})-"] if years else []
    if _below(month):
        options.append(f"{year}-(?:{'|'.join(_below(month))})-")
    options.append(f"{year}-{month}-(?:{'|'.join([*_below(day), day])})")
    return f"^(?:{'|'.join(options)})"


def _below(limit: str) -> list[str]:
    """Regex alternatives for the digit strings as long as `limit` and less than it."""
    out = []
    for i, digit in enumerate(limit):
        if digit != "0":
            top = int(digit) - 1
            out.append(limit[:i] + (f"[0-{top}]" if top else "0") + "\\d" * (len(limit) - i - 1))
    return out


def mail_templates() -> list[str]:
    """Every `email/<name>.txt` a mail can name (not the `_` partials)."""
    names = []
    for path in current_app.jinja_env.list_templates(extensions=["txt"]):
        name = path.removeprefix("email/").removesuffix(".txt")
        if path.startswith("email/") and not any(p.startswith("_") for p in name.split("/")):
            names.append(name)
    return sorted(names)


@health.get("/healthz")
def healthz() -> tuple[Response, int]:
    """Redis reachable, queue depths, workers: 200 when Redis answers, else 503."""
    try:
        redis_client = get_redis()
        queues = [get_queue(name) for name in QUEUE_NAMES]
        with redis_client.pipeline(transaction=False) as pipe:
            for queue in queues:
                queue_sizes(pipe, queue)
            sizes: list[Any] = pipe.execute()
        counts = {
            queue.name: dict(zip(SIZE_NAMES, sizes[4 * i : 4 * i + 4], strict=True))
            for i, queue in enumerate(queues)
        }
        workers = Worker.count(connection=redis_client)
    except redis.exceptions.RedisError as err:
        return jsonify({"status": "unavailable", "redis": f"unreachable: {err}"}), 503
    return jsonify({"status": "ok", "redis": "ok", "queues": counts, "workers": workers}), 200


def _api_error(err: ApiError) -> Response:
    return error_response(err.status_code, err.message, err.field)


def _invalid_mail(err: InvalidMailError) -> Response:
    if err.field == "idempotency_key":  # it came as the Idempotency-Key header
        reason = str(err).removeprefix(f"{err.field}: ")
        code = 409 if isinstance(err, IdempotencyConflictError) else 400
        return error_response(code, f"Idempotency-Key: {reason}", "Idempotency-Key")
    return error_response(400, str(err), err.field)


def _not_found(err: SubscriberNotFoundError) -> Response:
    return error_response(404, str(err), "email")


def _unavailable(err: Exception) -> Response:
    log.error("redis unavailable: %s", err)
    return error_response(503, "the queue is unavailable (Redis unreachable); nothing was queued")


def _http_error(err: HTTPException) -> Response | HTTPException:
    """JSON for API paths and oversize bodies; Flask's page elsewhere."""
    if request.path.startswith("/api/") or err.code == 413:
        response = error_response(err.code or 500, err.description or err.name)
        # The error's own headers stay: a 405's Allow (RFC 9110 requires it), for one.
        for name, value in err.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response
    return err


def _unexpected(err: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, "internal error")


def init_app(app: Flask) -> None:
    app.url_map.converters["address"] = AddressConverter
    app.register_blueprint(bp)
    app.register_blueprint(health)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(InvalidMailError, _invalid_mail)
    app.register_error_handler(SubscriberNotFoundError, _not_found)
    app.register_error_handler(QueueUnavailableError, _unavailable)
    app.register_error_handler(redis.exceptions.RedisError, _unavailable)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
