"""Hostile and bad input: refused with 4xx JSON naming the field, and nothing written.

Also: the OpenAPI document describes every route, and hypothesis fuzzes the API.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

from app.errors import HeaderInjectionError, InvalidMailError
from app.mail import prepare, send_email


def snapshot(redis_client: Redis) -> dict[bytes, bytes | None]:
    """Every key with its serialised value: equal snapshots mean nothing was written."""
    return {key: redis_client.dump(key) for key in redis_client.scan_iter(count=1000)}


def post(client: FlaskClient, auth: dict[str, str], body: Any) -> Any:
    return client.post("/api/mail", json=body, headers=auth)


VALID = {"to": "ann@example.com", "subject": "Hello", "template": "test", "context": {}}
DEEP: dict[str, Any] = {}
_level = DEEP
for _ in range(30):
    _level["x"] = {}
    _level = _level["x"]

HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("CRLF in to", {"to": "ann@example.com\r\nBcc: evil@example.com"}, "to"),
    ("LF in a display name", {"to": '"Ann\nBcc: evil@x.com" <ann@example.com>'}, "to"),
    ("two addresses in one item", {"to": "ann@example.com, evil@example.com"}, "to"),
    ("semicolon list", {"to": "ann@example.com;evil@example.com"}, "to"),
    ("CRLF in subject", {"subject": "Hi\r\nBcc: evil@example.com"}, "subject"),
    ("bare CR in subject", {"subject": "Hi\rBcc: evil@example.com"}, "subject"),
    ("NUL in subject", {"subject": "Hi\x00there"}, "subject"),
    ("vertical tab in subject", {"subject": "Hi\x0bBcc: evil@example.com"}, "subject"),
    ("NEL in subject", {"subject": "Hi\x85Bcc: evil@example.com"}, "subject"),
    ("U+2028 in subject", {"subject": "Hi\u2028Bcc: evil@example.com"}, "subject"),
    ("empty subject", {"subject": "  "}, "subject"),
    ("huge subject", {"subject": "x" * 5000}, "subject"),
    ("non-ASCII local part", {"to": "jörg@example.com"}, "to"),
    ("non-ASCII domain", {"to": "ann@exämple.com"}, "to"),
    ("no domain dot", {"to": "ann@localhost"}, "to"),
    ("not an address", {"to": "not an address"}, "to"),
    ("empty recipient list", {"to": []}, "to"),
    ("too many recipients", {"to": [f"u{i}@example.com" for i in range(51)]}, "to"),
    ("number as recipient", {"to": [42]}, "to"),
    ("template ..", {"template": "../etc/passwd"}, "template"),
    ("template absolute", {"template": "/etc/passwd"}, "template"),
    ("template backslash", {"template": "..\\..\\secret"}, "template"),
    ("template odd characters", {"template": "test%00.txt"}, "template"),
    ("template upper case", {"template": "TEST"}, "template"),
    ("template that does not exist", {"template": "nope"}, "template"),
    ("template layout partial", {"template": "_layout"}, "template"),
    ("template as a list", {"template": ["test"]}, "template"),
    ("context key template", {"context": {"template": "x"}}, "context"),
    ("context key template_name_or_list", {"context": {"template_name_or_list": 1}}, "context"),
    ("context not an object", {"context": [1, 2]}, "context"),
    ("context too deep", {"context": DEEP}, "context"),
    ("context too large", {"context": {"x": "a" * (300 * 1024)}}, "context"),
    ("send_at naive", {"send_at": "2030-01-01T09:00:00"}, "send_at"),
    ("send_at garbage", {"send_at": "tomorrow"}, "send_at"),
    ("send_at far ahead", {"send_at": "2999-01-01T09:00:00+00:00"}, "send_at"),
    ("send_at before year 1 in UTC", {"send_at": "0001-01-01T00:00:00+14:00"}, "send_at"),
    ("send_at after year 9999 in UTC", {"send_at": "9999-12-31T23:59:59-14:00"}, "send_at"),
    ("send_at and delay", {"send_at": "2030-01-01T09:00:00Z", "delay": 5}, "send_at"),
    ("negative delay", {"delay": -1}, "delay"),
    ("huge delay", {"delay": 1e300}, "delay"),
    ("delay too big for a float", {"delay": 10**400}, "delay"),
    ("boolean delay", {"delay": True}, "delay"),
    ("unknown field", {"importance": "high"}, "importance"),
    ("missing subject", {"subject": None}, "subject"),
]


@pytest.mark.parametrize(("case", "override", "field"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_mail_is_refused_and_nothing_written(
    client: FlaskClient,
    auth: dict[str, str],
    redis_client: Redis,
    case: str,
    override: dict[str, Any],
    field: str,
) -> None:
    body = {**VALID, **override}
    body = {k: v for k, v in body.items() if v is not None}
    before = snapshot(redis_client)
    response = post(client, auth, body)
    assert response.status_code == 400, response.get_json()
    payload = response.get_json()
    assert payload["field"] == field and payload["error"]
    assert snapshot(redis_client) == before


def test_send_email_refuses_the_same_input(app_ctx: Flask, redis_client: Redis) -> None:
    before = snapshot(redis_client)
    with pytest.raises(HeaderInjectionError):
        send_email("ann@example.com", "Hi\r\nBcc: evil@example.com", "test")
    with pytest.raises(InvalidMailError):
        send_email("ann@example.com", "Hi", "../../etc/passwd")
    with pytest.raises(InvalidMailError):
        send_email("ann@example.com", "Hi", "test", obj=object())
    with pytest.raises(InvalidMailError):
        send_email("ann@example.com", "Hi", ["test"])  # type: ignore[arg-type]
    assert snapshot(redis_client) == before


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Campaign": "a\r\nBcc: evil@example.com"},
        {"X-Campaign\r\nBcc": "evil@example.com"},
        {"X Campaign": "ok"},
        {"Bcc": "evil@example.com"},
        {"Message-ID": "<forged@example.com>"},
        {"List-Unsubscribe": "<https://x.example/u/\u2028t>"},
    ],
)
def test_context_driven_headers_are_checked(app_ctx: Flask, headers: dict[str, str]) -> None:
    with pytest.raises(HeaderInjectionError):
        prepare("ann@example.com", "Hi", "test", {}, headers=headers)


def test_display_names_may_use_any_script(app_ctx: Flask) -> None:
    from email.header import decode_header, make_header

    record = prepare("Jörg Ünal <jorg@example.com>", "Grüße", "test", {})
    [to] = record.to
    assert to.endswith(" <jorg@example.com>") and to.isascii()
    assert str(make_header(decode_header(to))) == "Jörg Ünal <jorg@example.com>"


# -- bodies -------------------------------------------------------------------------


def test_oversized_body_is_413_json(client: FlaskClient, auth: dict[str, str], app: Flask) -> None:
    limit = app.config["MAX_CONTENT_LENGTH"]
    # The default leaves room for a mail at MAIL_MAX_ATTACHMENT_BYTES, in base64.
    assert limit > app.config["MAIL_MAX_ATTACHMENT_BYTES"] * 4 // 3 > 13 * 1024 * 1024
    body = json.dumps({**VALID, "context": {"x": "a" * limit}}).encode()
    response = client.post("/api/mail", data=body, content_type="application/json", headers=auth)
    assert response.status_code == 413
    assert "error" in response.get_json()


def test_oversized_chunked_body_is_413_json(
    client: FlaskClient, auth: dict[str, str], app: Flask, redis_client: Redis
) -> None:
    """A chunked body has no Content-Length; Werkzeug cuts it at the limit (gunicorn
    sets wsgi.input_terminated), which must still be refused, not parsed."""
    body = json.dumps({**VALID, "context": {"x": "a" * app.config["MAX_CONTENT_LENGTH"]}})
    response = client.post(
        "/api/mail",
        input_stream=io.BytesIO(body.encode()),
        content_type="application/json",
        headers={**auth, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert redis_client.dbsize() == 0


def test_limit_is_configurable(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from app import create_app

    monkeypatch.setenv("MAX_CONTENT_LENGTH", "2048")
    client = create_app({"TESTING": True}).test_client()
    body = json.dumps({**VALID, "context": {"x": "a" * 3000}})
    response = client.post(
        "/api/mail",
        data=body,
        content_type="application/json",
        headers={"Authorization": f"Bearer {env['API_TOKEN']}"},
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        ("[" * 100_000 + "]" * 100_000, "application/json", 400),
        ('{"to": NaN}', "application/json", 400),
        (b"\xff\xfe{", "application/json", 400),
        ("[1, 2]", "application/json", 400),
        ("to=ann@example.com", "application/x-www-form-urlencoded", 415),
        ("", "application/json", 400),
    ],
)
def test_malformed_bodies(
    client: FlaskClient,
    auth: dict[str, str],
    redis_client: Redis,
    data: str | bytes,
    content_type: str,
    status: int,
) -> None:
    response = client.post("/api/mail", data=data, content_type=content_type, headers=auth)
    assert response.status_code == status
    assert "error" in response.get_json()
    assert redis_client.dbsize() == 0


# -- the OpenAPI document ---------------------------------------------------------------


def test_openapi_document_describes_every_route(client: FlaskClient, app: Flask) -> None:
    response = client.get("/api/openapi.json")  # public: no token
    assert response.status_code == 200 and response.mimetype == "application/json"
    doc = response.get_json()
    assert doc["openapi"].startswith("3.")
    documented = {
        (path, method.upper())
        for path, operations in doc["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "delete", "patch"}
    }
    served = set()
    for rule in app.url_map.iter_rules():
        # /dev/* are HTML pages for developers (README), registered only in some setups.
        # /ops/ is the operator's HTML page; /webhooks/* take the providers' formats, not
        # this API's, and exist only where configured (docs/deliverability.md).
        if rule.endpoint == "static" or rule.endpoint.split(".")[0] in {
            "dev",
            "previews",
            "outbox",
            "ops",
            "webhooks",
        }:
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)  # <address:email> -> {email}
        for method in rule.methods - {"HEAD", "OPTIONS"}:  # type: ignore[operator]
            served.add((path, method))
    assert served == documented
    for operations in doc["paths"].values():
        for operation in operations.values():
            assert operation["responses"], operation


# -- fuzzing ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
addresses = st.one_of(
    st.emails(),
    st.text(max_size=60),
    st.builds(lambda n, a: f"{n} <{a}>", st.text(max_size=20), st.emails()),
)
mail_bodies = st.fixed_dictionaries(
    {},
    optional={
        "to": st.one_of(addresses, st.lists(addresses, max_size=3), json_values),
        "subject": st.one_of(st.text(max_size=80), json_values),
        "template": st.one_of(
            st.sampled_from(["test", "../test", "/test", "Test", "te st"]), st.text(max_size=20)
        ),
        "context": st.one_of(
            st.dictionaries(st.text(max_size=8), json_values, max_size=4), json_values
        ),
        "send_at": st.one_of(
            st.text(max_size=30), st.datetimes().map(lambda d: d.isoformat()), json_values
        ),
        "delay": st.one_of(st.floats(allow_nan=False), st.integers(), json_values),
        "extra": json_values,
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=mail_bodies)
def test_fuzz_post_mail(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis, body: dict[str, Any]
) -> None:
    before = snapshot(redis_client)
    response = post(client, auth, body)
    assert response.status_code < 500, response.get_json()
    payload = response.get_json()
    if response.status_code == 202:
        assert redis_client.exists(f"mq:mail:{payload['id']}")
        redis_client.flushall()
    else:
        assert response.status_code in (400, 413, 415)
        assert payload["error"]
        assert snapshot(redis_client) == before


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    # Header values a client can send (the test client refuses CR/LF itself).
    token=st.one_of(
        st.none(), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
    ),
)
def test_fuzz_other_routes(
    client: FlaskClient, redis_client: Redis, path: str, method: str, token: str | None
) -> None:
    before = snapshot(redis_client)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    response = client.open(
        "/api/" + path.replace("?", "").replace("#", ""), method=method, headers=headers
    )
    assert response.status_code < 500
    assert snapshot(redis_client) == before


# -- the subscriber API (digests) ---------------------------------------------------------

SUBSCRIBER = {"timezone": "Europe/Paris", "frequency": "daily", "hour": 8}
HOSTILE_SUBSCRIBERS: list[tuple[str, str, dict[str, Any], str]] = [
    ("unknown time zone", "ann@example.com", {"timezone": "Mars/Olympus"}, "timezone"),
    ("time zone path", "ann@example.com", {"timezone": "../../etc/passwd"}, "timezone"),
    ("time zone absolute", "ann@example.com", {"timezone": "/usr/share/zoneinfo/UTC"}, "timezone"),
    ("time zone with NUL", "ann@example.com", {"timezone": "Europe/Paris\x00"}, "timezone"),
    ("hour 24", "ann@example.com", {"hour": 24}, "hour"),
    ("hour -1", "ann@example.com", {"hour": -1}, "hour"),
    ("hour as text", "ann@example.com", {"hour": "8"}, "hour"),
    ("hour huge", "ann@example.com", {"hour": 10**30}, "hour"),
    ("bad frequency", "ann@example.com", {"frequency": "hourly"}, "frequency"),
    ("bad weekday", "ann@example.com", {"frequency": "weekly", "weekday": "funday"}, "weekday"),
    ("unknown field", "ann@example.com", {"admin": True}, "admin"),
    ("non-ASCII address", "jörg@example.com", {}, "email"),
    ("CRLF in address", "ann@example.com%0d%0aBcc:%20x@y.com", {}, "email"),
    ("not an address", "not-an-address", {}, "email"),
]


@pytest.mark.parametrize(
    ("case", "email", "override", "field"),
    HOSTILE_SUBSCRIBERS,
    ids=[c[0] for c in HOSTILE_SUBSCRIBERS],
)
def test_hostile_subscriber_is_refused_and_nothing_written(
    client: FlaskClient,
    auth: dict[str, str],
    redis_client: Redis,
    case: str,
    email: str,
    override: dict[str, Any],
    field: str,
) -> None:
    before = snapshot(redis_client)
    response = client.put(
        f"/api/subscribers/{email}", json={**SUBSCRIBER, **override}, headers=auth
    )
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["field"] == field
    assert snapshot(redis_client) == before


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"title": ""}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": "ok", "url": "javascript:alert(1)"}, "url"),
        ({"title": "ok", "url": "http://[abc/x"}, "url"),
        ({"title": "ok", "url": "https://x.example/" + "a" * 3000}, "url"),
        ({"title": "ok", "kind": "../x"}, "kind"),
        ({"title": "ok", "body": "b" * 2001}, "body"),
        ({"title": ["not", "text"]}, "title"),
    ],
)
def test_hostile_items_are_refused_and_nothing_written(
    client: FlaskClient,
    auth: dict[str, str],
    redis_client: Redis,
    item: dict[str, Any],
    field: str,
) -> None:
    assert (
        client.put("/api/subscribers/ann@example.com", json=SUBSCRIBER, headers=auth).status_code
        == 201
    )
    before = snapshot(redis_client)
    response = client.post("/api/subscribers/ann@example.com/items", json=item, headers=auth)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["field"] == field
    assert snapshot(redis_client) == before


subscriber_bodies = st.fixed_dictionaries(
    {},
    optional={
        "timezone": st.one_of(
            st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "../UTC"]),
            st.text(max_size=30),
            json_values,
        ),
        "frequency": st.one_of(st.sampled_from(["daily", "weekly", "off"]), json_values),
        "hour": st.one_of(st.integers(-5, 30), json_values),
        "weekday": st.one_of(st.sampled_from(["monday", "sunday", "Monday"]), json_values),
        "extra": json_values,
    },
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    email=st.one_of(st.emails(), st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)),
    body=subscriber_bodies,
)
def test_fuzz_put_subscriber(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis, email: str, body: dict[str, Any]
) -> None:
    from urllib.parse import quote

    before = snapshot(redis_client)
    response = client.put(f"/api/subscribers/{quote(email, safe='@')}", json=body, headers=auth)
    assert response.status_code < 500, response.get_json()
    if response.status_code in (200, 201):
        redis_client.flushall()
    else:
        assert snapshot(redis_client) == before


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    item=st.fixed_dictionaries(
        {},
        optional={
            "title": st.one_of(st.text(max_size=60), json_values),
            "url": st.one_of(st.text(max_size=60), st.just("https://x.example/a"), json_values),
            "body": st.one_of(st.text(max_size=60), json_values),
            "kind": st.one_of(st.text(max_size=10), json_values),
            "extra": json_values,
        },
    )
)
def test_fuzz_post_item(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis, item: dict[str, Any]
) -> None:
    redis_client.flushall()
    assert (
        client.put("/api/subscribers/ann@example.com", json=SUBSCRIBER, headers=auth).status_code
        == 201
    )
    before = snapshot(redis_client)
    response = client.post("/api/subscribers/ann@example.com/items", json=item, headers=auth)
    assert response.status_code < 500, response.get_json()
    if response.status_code != 202:
        assert snapshot(redis_client) == before


# -- the suppression list and the recipient log (deliverability) --------------------------

HOSTILE_SUPPRESSIONS: list[tuple[str, str, Any, str]] = [
    ("CRLF in address", "ann@example.com%0d%0aBcc:%20x@y.com", {"reason": "manual"}, "email"),
    ("display name", "Ann%20%3Cann@example.com%3E", {"reason": "manual"}, "email"),
    ("non-ASCII address", "j\u00f6rg@example.com", {"reason": "manual"}, "email"),
    ("not an address", "not-an-address", {"reason": "manual"}, "email"),
    ("unknown reason", "ann@example.com", {"reason": "spam"}, "reason"),
    ("reason as a list", "ann@example.com", {"reason": ["manual"]}, "reason"),
    ("no reason", "ann@example.com", {"detail": "x"}, "reason"),
    ("source given", "ann@example.com", {"reason": "manual", "source": "smtp"}, "source"),
    ("huge detail", "ann@example.com", {"reason": "manual", "detail": "d" * 501}, "detail"),
    ("detail as a number", "ann@example.com", {"reason": "manual", "detail": 5}, "detail"),
]


@pytest.mark.parametrize(
    ("case", "email", "body", "field"),
    HOSTILE_SUPPRESSIONS,
    ids=[c[0] for c in HOSTILE_SUPPRESSIONS],
)
def test_hostile_suppression_is_refused_and_nothing_written(
    client: FlaskClient,
    auth: dict[str, str],
    redis_client: Redis,
    case: str,
    email: str,
    body: Any,
    field: str,
) -> None:
    before = snapshot(redis_client)
    response = client.put(f"/api/suppressions/{email}", json=body, headers=auth)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["field"] == field
    assert snapshot(redis_client) == before


@pytest.mark.parametrize(
    "query",
    ["to=", "to=ann@example.com%0d%0a", "to=ann", "to=" + "a" * 300 + "@example.com",
     "to=ann@example.com&to=bob@example.com&limit=9", "to[]=x"],
)  # fmt: skip
def test_hostile_mail_log_queries_are_4xx_and_write_nothing(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis, query: str
) -> None:
    before = snapshot(redis_client)
    response = client.get(f"/api/mail?{query}", headers=auth)
    assert response.status_code == 400 and response.get_json()["error"]
    assert snapshot(redis_client) == before


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    email=st.one_of(st.emails(), st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)),
    body=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {},
            optional={
                "reason": st.one_of(st.sampled_from(["hard_bounce", "complaint", "manual"]),
                                    json_values),
                "detail": st.one_of(st.text(max_size=60), json_values),
                "extra": json_values,
            },
        ),
    ),
    method=st.sampled_from(["GET", "PUT", "DELETE"]),
)  # fmt: skip
def test_fuzz_suppressions(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis, email: str, body: Any,
    method: str,
) -> None:  # fmt: skip
    from urllib.parse import quote

    before = snapshot(redis_client)
    url = f"/api/suppressions/{quote(email, safe='@')}"
    response = client.open(url, method=method, json=body, headers=auth)
    assert response.status_code < 500, response.get_json()
    if response.status_code in (200, 201) and method == "PUT":
        redis_client.flushall()
    else:
        assert snapshot(redis_client) == before


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    query=st.dictionaries(
        st.sampled_from(["to", "limit", "cursor", "x"]),
        st.one_of(st.emails(), st.text(max_size=30)),
        max_size=3,
    ),
    path=st.sampled_from(["/api/mail", "/api/suppressions"]),
)
def test_fuzz_query_strings(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis, query: dict[str, str],
    path: str,
) -> None:  # fmt: skip
    before = snapshot(redis_client)
    response = client.get(path, query_string=query, headers=auth)
    assert response.status_code in (200, 400), response.get_json()
    assert snapshot(redis_client) == before


# -- provider webhooks (deliverability) ---------------------------------------------------


@pytest.fixture
def webhook_client(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> FlaskClient:
    """Every webhook on, with secrets the fuzzer does not know."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from app import create_app

    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    import base64

    def offline(*args: Any, **kwargs: Any) -> Any:  # this machine has no network anyway
        raise OSError("no certificate fetches in the hostile-input suite")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    monkeypatch.setenv("MAILGUN_WEBHOOK_SIGNING_KEY", "k" * 32)
    monkeypatch.setenv("SENDGRID_WEBHOOK_PUBLIC_KEY", base64.b64encode(public).decode())
    monkeypatch.setenv("SES_SNS_TOPIC_ARNS", "arn:aws:sns:eu-west-1:123456789012:t")
    monkeypatch.setenv("POSTMARK_WEBHOOK_USER", "u")
    monkeypatch.setenv("POSTMARK_WEBHOOK_PASSWORD", "p")
    return create_app({"TESTING": True}).test_client()


webhook_bodies = st.one_of(
    json_values,
    st.binary(max_size=200),
    st.fixed_dictionaries(
        {},
        optional={
            "signature": st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {"timestamp": st.text(max_size=12), "token": st.text(max_size=20),
                     "signature": st.text(max_size=70)}
                ),
            ),
            "event-data": json_values,
            "Type": st.sampled_from(["Notification", "SubscriptionConfirmation", "x"]),
            "TopicArn": st.sampled_from(["arn:aws:sns:eu-west-1:123456789012:t", "x"]),
            "MessageId": st.text(max_size=10),
            "Timestamp": st.text(max_size=30),
            "SignatureVersion": st.sampled_from(["1", "2", "3"]),
            "SigningCertURL": st.sampled_from(
                ["https://sns.eu-west-1.amazonaws.com/x.pem", "https://evil.example/x.pem"]
            ),
            "Signature": st.text(max_size=40),
            "Message": json_values,
            "RecordType": st.sampled_from(["Bounce", "SpamComplaint", "Open"]),
            "Type_": json_values,
            "BouncedAt": st.text(max_size=30),
            "ID": json_values,
        },
    ),
)  # fmt: skip


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    provider=st.sampled_from(["mailgun", "sendgrid", "ses", "postmark"]),
    body=webhook_bodies,
    headers=st.dictionaries(
        st.sampled_from([
            "Authorization", "X-Twilio-Email-Event-Webhook-Signature",
            "X-Twilio-Email-Event-Webhook-Timestamp", "Content-Type",
        ]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    ),
)  # fmt: skip
def test_fuzz_webhooks_refuse_without_writing(
    webhook_client: FlaskClient, redis_client: Redis, provider: str, body: Any,
    headers: dict[str, str],
) -> None:  # fmt: skip
    """No secret, no signature, no certificate the fuzzer could know: always a 4xx, never
    a write, and never a certificate fetched (none is cached, and the only URLs that
    would be fetched are refused for their host or fail without a network)."""
    before = snapshot(redis_client)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = webhook_client.post(f"/webhooks/{provider}", data=data, headers=headers)
    assert 400 <= response.status_code < 500, (response.status_code, response.get_data())
    assert snapshot(redis_client) == before
