"""HTTP: the JSON API under /api (bearer token) and /healthz.

Every bad input answers 4xx JSON `{"error": "...", "field": "..."}`; an
unreachable Redis answers 503; nothing answers a bare 500 page.
"""

from __future__ import annotations

import hmac
import logging
import re
from datetime import datetime
from typing import Any

import redis.exceptions
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from rq import Worker
from werkzeug.exceptions import BadRequest, HTTPException

from app import status
from app.errors import InvalidMailError, QueueUnavailableError
from app.mail import enqueue, prepare
from app.queues import QUEUE_NAMES, get_queue, get_redis

log = logging.getLogger("mailqueue.api")

bp = Blueprint("api", __name__, url_prefix="/api")
health = Blueprint("health", __name__)

MAIL_ID = re.compile(r"^[0-9a-f]{32}$")


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
    """`Authorization: Bearer $API_TOKEN`, compared in constant time; never logged."""
    expected = current_app.config.get("API_TOKEN") or ""
    header = request.headers.get("Authorization", "")
    scheme, _, supplied = header.partition(" ")
    if not expected:
        return error_response(401, "the API is disabled: set API_TOKEN")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        supplied.strip().encode(), expected.encode()
    ):
        return error_response(401, "missing or wrong bearer token")
    return None


def json_body() -> dict[str, Any]:
    """The request's JSON object, or an ApiError saying what is wrong with it."""
    if not request.is_json:
        raise ApiError(415, "expected Content-Type: application/json")
    try:
        data = request.get_json()
    except BadRequest:
        raise ApiError(400, "the body is not valid JSON") from None
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


def parse_datetime(name: str, value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(
            400, f"{name} must be an ISO 8601 date-time with a UTC offset", name
        ) from None


@bp.post("/mail")
def post_mail() -> tuple[Response, int]:
    data = json_body()
    unknown = set(data) - {"to", "subject", "template", "context", "send_at", "delay"}
    if unknown:
        raise ApiError(400, f"unknown field {sorted(unknown)[0]}", sorted(unknown)[0])
    to = field(data, "to", (str, list))
    subject = field(data, "subject", str)
    template = field(data, "template", str)
    context = field(data, "context", dict, required=False) or {}
    send_at_raw = field(data, "send_at", str, required=False)
    delay = field(data, "delay", (int, float), required=False)
    send_at = parse_datetime("send_at", send_at_raw) if send_at_raw else None
    record = prepare(to, subject, template, context, send_at=send_at, delay=delay)
    enqueue([record])
    return jsonify({"id": record.id, "status": record.status}), 202


@bp.get("/mail/<mail_id>")
def get_mail(mail_id: str) -> Response:
    record = status.load(get_redis(), mail_id) if MAIL_ID.match(mail_id) else None
    if record is None:
        raise ApiError(404, f"no mail {mail_id}")
    return jsonify(record.public())


@health.get("/healthz")
def healthz() -> tuple[Response, int]:
    """Redis reachable, queue depths, workers: 200 when Redis answers, else 503."""
    try:
        redis_client = get_redis()
        redis_client.ping()
        queues = {}
        for name in QUEUE_NAMES:
            queue = get_queue(name)
            queues[name] = {
                "queued": queue.count,
                "scheduled": queue.scheduled_job_registry.count,
                "started": queue.started_job_registry.count,
                "failed": queue.failed_job_registry.count,
            }
        workers = Worker.count(connection=redis_client)
    except redis.exceptions.RedisError as err:
        return jsonify({"status": "unavailable", "redis": f"unreachable: {err}"}), 503
    return jsonify({"status": "ok", "redis": "ok", "queues": queues, "workers": workers}), 200


def _api_error(err: ApiError) -> Response:
    return error_response(err.status_code, err.message, err.field)


def _invalid_mail(err: InvalidMailError) -> Response:
    return error_response(400, str(err), err.field)


def _unavailable(err: Exception) -> Response:
    log.error("redis unavailable: %s", err)
    return error_response(503, "the queue is unavailable (Redis unreachable); nothing was queued")


def _http_error(err: HTTPException) -> Response | HTTPException:
    """JSON for API paths and oversize bodies; Flask's page elsewhere."""
    if request.path.startswith("/api/") or err.code == 413:
        return error_response(err.code or 500, err.description or err.name)
    return err


def _unexpected(err: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, "internal error")


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.register_blueprint(health)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(InvalidMailError, _invalid_mail)
    app.register_error_handler(QueueUnavailableError, _unavailable)
    app.register_error_handler(redis.exceptions.RedisError, _unavailable)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
