"""HTTP API: auth, input errors as 4xx JSON naming the field, 202/GET, /healthz."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from app import create_app, status
from app.worker import AppWorker
from tests.conftest import API_TOKEN
from tests.servers import SMTPServer, free_port


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


GOOD: dict[str, Any] = {
    "to": "ann@example.com",
    "subject": "Hello",
    "template": "test",
    "context": {"address": "Ann"},
}


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": f"Token {API_TOKEN}"}, id="wrong-scheme"),
        pytest.param({"Authorization": f"Basic {API_TOKEN}"}, id="basic"),
        pytest.param({"Authorization": "Bearer nope"}, id="wrong-token"),
        pytest.param({"Authorization": "Bearer "}, id="empty-token"),
        pytest.param({"Authorization": f"Bearer {API_TOKEN}x"}, id="token-prefix"),
    ],
)
def test_bad_credentials_answer_401_json(
    client: FlaskClient, redis_client: Redis, headers: dict[str, str]
) -> None:
    for response in (
        client.post("/api/mail", json=GOOD, headers=headers),
        client.get("/api/mail/" + "0" * 32, headers=headers),
    ):
        assert response.status_code == 401
        assert response.is_json and "token" in response.json["error"]  # type: ignore[index]
    assert redis_client.dbsize() == 0


def test_api_is_closed_when_no_token_is_configured(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, redis_client: Redis
) -> None:
    monkeypatch.delenv("API_TOKEN")
    client = create_app({"TESTING": True}).test_client()
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
        response = client.post("/api/mail", json=GOOD, headers=headers)
        assert response.status_code == 401
        assert "API_TOKEN" in response.json["error"]  # type: ignore[index]
    assert redis_client.dbsize() == 0


def test_post_answers_202_and_get_shows_the_record(
    client: FlaskClient, auth: dict[str, str], work: Any, smtp_server: SMTPServer
) -> None:
    response = client.post("/api/mail", json=GOOD, headers=auth)
    assert response.status_code == 202
    body = response.json
    assert body is not None and set(body) == {"id", "status"}
    assert body["status"] == "queued"
    mail_id = body["id"]

    view = client.get(f"/api/mail/{mail_id}", headers=auth).json
    assert view is not None
    assert view["id"] == mail_id and view["status"] == "queued" and view["attempts"] == 0
    assert view["to"] == ["ann@example.com"] and view["template"] == "test"
    assert "context" not in view

    work()
    [received] = smtp_server.wait_for(1)
    assert received.message_id == f"<{mail_id}@example.com>"
    view = client.get(f"/api/mail/{mail_id}", headers=auth).json
    assert view is not None
    assert view["status"] == "sent" and view["attempts"] == 1 and view["sent_at"]


def test_post_with_send_at_is_scheduled(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis
) -> None:
    when = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    local = when.astimezone(timezone(timedelta(hours=1)))
    body = dict(GOOD, send_at=local.isoformat())
    response = client.post("/api/mail", json=body, headers=auth)
    assert response.status_code == 202, response.json
    assert response.json["status"] == "scheduled"  # type: ignore[index]
    view = client.get(f"/api/mail/{response.json['id']}", headers=auth).json  # type: ignore[index]
    assert view["send_at"] == when.isoformat()  # type: ignore[index]


def test_failed_mail_shows_the_error(
    client: FlaskClient, auth: dict[str, str], work: Any, smtp_server: SMTPServer
) -> None:
    smtp_server.handler.reply = "550 5.1.1 mailbox unavailable"
    mail_id = client.post("/api/mail", json=GOOD, headers=auth).json["id"]  # type: ignore[index]
    work()
    view = client.get(f"/api/mail/{mail_id}", headers=auth).json
    assert view["status"] == "failed"  # type: ignore[index]
    assert "550 5.1.1 mailbox unavailable" in view["error"]  # type: ignore[index]


# (case id, request body or raw bytes, status, field named, words in the error)
BAD_INPUT: list[tuple[str, Any, int, str | None, str]] = [
    ("not json", b"{nope", 400, None, "not valid JSON"),
    ("array body", [GOOD], 400, None, "JSON object"),
    ("string body", "hello", 400, None, "JSON object"),
    ("null body", b"null", 400, None, "JSON object"),
    ("missing to", {k: v for k, v in GOOD.items() if k != "to"}, 400, "to", "required"),
    ("missing subject", {k: v for k, v in GOOD.items() if k != "subject"}, 400, "subject",
     "required"),
    ("missing template", {k: v for k, v in GOOD.items() if k != "template"}, 400, "template",
     "required"),
    ("unknown field", dict(GOOD, importance="high"), 400, "importance", "unknown field"),
    ("to a number", dict(GOOD, to=5), 400, "to", "a string or an array"),
    ("to an object", dict(GOOD, to={"a": 1}), 400, "to", "a string or an array"),
    ("to list of numbers", dict(GOOD, to=[1]), 400, "to", "email address"),
    ("subject a list", dict(GOOD, subject=["x"]), 400, "subject", "a string"),
    ("subject a bool", dict(GOOD, subject=True), 400, "subject", "a string"),
    ("template a number", dict(GOOD, template=1), 400, "template", "a string"),
    ("context a list", dict(GOOD, context=[1]), 400, "context", "an object"),
    ("context a string", dict(GOOD, context="x"), 400, "context", "an object"),
    ("send_at a number", dict(GOOD, send_at=1), 400, "send_at", "a string"),
    ("send_at garbage", dict(GOOD, send_at="tomorrow"), 400, "send_at", "ISO 8601"),
    ("send_at empty", dict(GOOD, send_at=""), 400, "send_at", "RFC 3339"),
    # ISO 8601 forms Python reads but RFC 3339 (the schema's date-time) does not have
    ("send_at basic form", dict(GOOD, send_at="20300101T090000Z"), 400, "send_at", "RFC 3339"),
    ("send_at with a space", dict(GOOD, send_at="2030-01-01 09:00:00+00:00"), 400, "send_at",
     "RFC 3339"),
    ("delay a string", dict(GOOD, delay="60"), 400, "delay", "a number"),
    ("delay a bool", dict(GOOD, delay=True), 400, "delay", "a number"),
    # The refusals of send_email, through the API.
    ("invalid address", dict(GOOD, to="nope"), 400, "to", "nope"),
    ("non-ASCII address", dict(GOOD, to="jöhn@example.com"), 400, "to", "non-ASCII"),
    ("LF in to", dict(GOOD, to="a@example.com\nBcc: e@example.com"), 400, "to", "CR, LF"),
    ("CRLF in subject", dict(GOOD, subject="Hi\r\nBcc: e@example.com"), 400, "subject",
     "CR, LF"),
    ("missing template file", dict(GOOD, template="nonexistent"), 400, "template",
     "no template"),
    ("template traversal", dict(GOOD, template="../../etc/passwd"), 400, "template", "'..'"),
    ("template absolute", dict(GOOD, template="/etc/passwd"), 400, "template", "absolute"),
    ("context too deep", dict(GOOD, context={"a": nested(25)}),
     400, "context", "deeper"),
    ("context too big", dict(GOOD, context={"a": "x" * 300_000}), 400, "context", "larger"),
    ("naive send_at", dict(GOOD, send_at="2030-01-01T09:00:00"), 400, "send_at",
     "timezone-aware"),
    ("send_at and delay", dict(GOOD, send_at="2030-01-01T09:00:00Z", delay=5), 400, "send_at",
     "not both"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "code", "field", "words"), [pytest.param(*c[1:], id=c[0]) for c in BAD_INPUT]
)
def test_bad_input_answers_4xx_json_naming_the_field_and_writes_nothing(
    client: FlaskClient,
    auth: dict[str, str],
    redis_client: Redis,
    body: Any,
    code: int,
    field: str | None,
    words: str,
) -> None:
    if isinstance(body, bytes):
        response = client.post(
            "/api/mail", data=body, headers={**auth, "Content-Type": "application/json"}
        )
    else:
        response = client.post("/api/mail", json=body, headers=auth)
    assert response.status_code == code, response.json
    assert response.is_json
    error = response.json
    assert error is not None and words in error["error"]
    assert error.get("field") == field
    if field:
        assert field in error["error"]
    assert redis_client.dbsize() == 0


def test_non_json_content_type_is_415(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.post("/api/mail", data="to=ann@example.com", headers=auth)
    assert response.status_code == 415
    assert "application/json" in response.json["error"]  # type: ignore[index]


def test_oversize_body_is_413_json(client: FlaskClient, auth: dict[str, str]) -> None:
    body = dict(GOOD, context={"a": "x" * (16 * 1024 * 1024)})
    response = client.post("/api/mail", json=body, headers=auth)
    assert response.status_code == 413
    assert response.is_json


@pytest.mark.parametrize(
    "mail_id", ["0" * 32, "abc", "../../healthz", "0" * 31 + "g", "A" * 32, "0" * 33]
)
def test_unknown_or_malformed_id_is_404_json(
    client: FlaskClient, auth: dict[str, str], mail_id: str
) -> None:
    response = client.get(f"/api/mail/{mail_id}", headers=auth)
    assert response.status_code == 404
    assert response.is_json and "error" in response.json  # type: ignore[operator]


def test_unknown_api_path_is_404_json(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.get("/api/nothing-here", headers=auth)
    assert response.status_code == 404 and response.is_json


def test_healthz_reports_queue_depths_and_workers(
    app: Flask, client: FlaskClient, redis_client: Redis, auth: dict[str, str]
) -> None:
    client.post("/api/mail", json=GOOD, headers=auth)
    client.post("/api/mail", json=GOOD, headers=auth)
    client.post("/api/mail", json=dict(GOOD, delay=600), headers=auth)
    worker = AppWorker(["mail", "digests"])
    worker.register_birth()
    try:
        response = client.get("/healthz")
    finally:
        worker.register_death()
    assert response.status_code == 200
    body = response.json
    assert body is not None
    assert body["status"] == "ok" and body["redis"] == "ok"
    assert body["workers"] == 1
    assert body["queues"]["mail"] == {"queued": 2, "scheduled": 1, "started": 0, "failed": 0}
    assert body["queues"]["digests"]["queued"] == 0
    assert client.get("/healthz").json["workers"] == 0  # type: ignore[index]


@pytest.fixture
def down_client(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> FlaskClient:
    """An app whose REDIS_URL points at a port where nothing listens."""
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    return create_app({"TESTING": True}).test_client()


def test_healthz_is_503_fast_when_redis_is_down(down_client: FlaskClient) -> None:
    started = time.monotonic()
    response = down_client.get("/healthz")
    assert time.monotonic() - started < 1.0
    assert response.status_code == 503
    assert response.json["status"] == "unavailable"  # type: ignore[index]
    assert "unreachable" in response.json["redis"]  # type: ignore[index]


def test_post_is_503_fast_when_redis_is_down(
    down_client: FlaskClient, auth: dict[str, str]
) -> None:
    started = time.monotonic()
    post = down_client.post("/api/mail", json=GOOD, headers=auth)
    get = down_client.get("/api/mail/" + "0" * 32, headers=auth)
    assert time.monotonic() - started < 1.0
    for response in (post, get):
        assert response.status_code == 503
        assert response.is_json and "unavailable" in response.json["error"]  # type: ignore[index]


def test_validation_still_answers_400_when_redis_is_down(
    down_client: FlaskClient, auth: dict[str, str]
) -> None:
    response = down_client.post("/api/mail", json=dict(GOOD, to="nope"), headers=auth)
    assert response.status_code == 400
    assert status.QUEUED not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("today", "inside", "outside"),
    [
        ("2026-12-03", ["2027-01-15", "2027-12-03", "1000-01-01", "2026-06-30"], ["2027-12-04"]),
        ("2026-01-01", ["2027-01-01", "2026-12-31"], ["2027-01-02", "0999-12-31", "2028-01-01"]),
        ("2030-10-09", ["2030-10-09", "2031-10-09", "2031-09-30"], ["2031-10-10", "2031-11-01"]),
    ],
)
def test_the_served_send_at_pattern_allows_up_to_a_year_ahead(
    today: str, inside: list[str], outside: list[str]
) -> None:
    """The schema's "at most a year ahead": in December, January is in (the API takes up
    to 366 days; the pattern stops a day short, for the offsets)."""
    import re
    from datetime import date

    from app.api import send_at_pattern

    pattern = re.compile(send_at_pattern(date.fromisoformat(today)))
    assert all(pattern.match(f"{d}T09:00:00Z") for d in inside)
    assert not any(pattern.match(f"{d}T09:00:00Z") for d in outside)
