"""HTTP for deliverability: the suppression list under /api/suppressions and a
recipient's mail log at GET /api/mail?to=<address> (bearer token, like all of /api).

Its own blueprint with app.api's token check, so these routes stay out of app/api.py's
way; errors are app.api's ApiError and InvalidMailError, answered as JSON there.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request

from app import deliverability, digests, maillog, suppression
from app.api import ApiError, field, json_body, refuse_unknown, require_token
from app.errors import InvalidMailError
from app.queues import get_redis

bp = Blueprint("deliverability_api", __name__, url_prefix="/api")
bp.before_request(require_token)

DEFAULT_PAGE = 50
MAX_PAGE = 500
SUPPRESSION_FIELDS = {"reason", "detail"}


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}", name)
    return int(raw)


def _address(raw: str, name: str = "email") -> str:
    """A bare address, lowercased (the list's key); 400 naming `name` otherwise (control
    characters too, which address validation would strip from either end)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise ApiError(400, f"{name}: control characters are not allowed", name)
    try:
        return digests.normalize_email(raw)
    except InvalidMailError as err:
        message = str(err).removeprefix(f"{err.field}: ")
        raise ApiError(400, f"{name}: {message}", name) from None


@bp.get("/suppressions")
def list_suppressions() -> Response:
    """Newest first; `cursor` is the offset the previous page's `next` gave."""
    limit = _int_arg("limit", DEFAULT_PAGE, 1, MAX_PAGE)
    cursor = _int_arg("cursor", 0, 0, 10**9)
    entries, total = suppression.page(get_redis(), cursor, limit)
    following = cursor + limit if cursor + limit < total else None
    return jsonify(
        {
            "suppressions": [entry.public() for entry in entries],
            "total": total,
            "next": str(following) if following is not None else None,
        }
    )


@bp.get("/suppressions/<address:email>")
def get_suppression(email: str) -> Response:
    entry = suppression.get(get_redis(), _address(email))
    if entry is None:
        raise ApiError(404, f"{_address(email)} is not suppressed", "email")
    return jsonify(entry.public())


@bp.put("/suppressions/<address:email>")
def put_suppression(email: str) -> tuple[Response, int]:
    """Suppress an address (201), or replace its entry (200); source `api`."""
    address = _address(email)
    data = json_body()
    refuse_unknown(data, SUPPRESSION_FIELDS)
    reason = field(data, "reason", str)
    detail = field(data, "detail", str, required=False) or ""
    if reason not in suppression.REASONS:
        raise ApiError(400, f"reason must be one of {', '.join(suppression.REASONS)}", "reason")
    if len(detail) > suppression.MAX_DETAIL:
        raise ApiError(400, f"detail is longer than {suppression.MAX_DETAIL} characters", "detail")
    existed = suppression.get(get_redis(), address) is not None
    entry = deliverability.suppress(address, reason, "api", detail)
    return jsonify(entry.public()), 200 if existed else 201


@bp.delete("/suppressions/<address:email>")
def delete_suppression(email: str) -> tuple[str, int]:
    address = _address(email)
    if not suppression.remove(get_redis(), address):
        raise ApiError(404, f"{address} is not suppressed", "email")
    return "", 204


@bp.get("/mail")
def mail_log() -> Response:
    """The latest mails (at most 50) to one recipient, newest first, and whether the
    address is suppressed: support's "did she get her mail?"."""
    unknown = sorted(set(request.args) - {"to"})
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]}", unknown[0])
    raw = request.args.get("to")
    if not raw:
        raise ApiError(400, "to is required: the recipient address to look up", "to")
    address = _address(raw, "to")
    redis = get_redis()
    records = maillog.recent(redis, address)
    entry = suppression.get(redis, address)
    body: dict[str, Any] = {
        "to": address,
        "mails": [maillog.summary(record) for record in records],
        "suppression": entry.public() if entry else None,
    }
    return jsonify(body)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
