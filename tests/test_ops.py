"""The operator page /ops/ through the test client: sign-in, forms and what they do."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from app import create_app, deliverability, status, suppression
from app.mail import send_email
from tests.conftest import API_TOKEN
from tests.servers import SMTPServer


def form_token(page: str) -> str:
    found = re.search(r'name="form_token" value="([0-9a-f]+)"', page)
    assert found, "no form token on the page"
    return found.group(1)


def signed_in(client: FlaskClient) -> FlaskClient:
    response = client.post("/ops/login", data={"token": API_TOKEN, "next": "/ops/"})
    assert response.status_code == 302 and response.headers["Location"] == "/ops/"
    return client


def test_closed_without_the_token_and_no_token_in_urls(client: FlaskClient) -> None:
    for path in ("/ops/", "/ops/suppressions", "/ops/address/ann@example.com"):
        response = client.get(path)
        assert response.status_code == 401 and b'name="token"' in response.data
    assert client.get("/ops/?token=" + API_TOKEN).status_code == 401
    wrong = client.post("/ops/login", data={"token": "nope"})
    assert wrong.status_code == 401 and b"not the API token" in wrong.data
    # Never redirected off-site after signing in.
    away = client.post("/ops/login", data={"token": API_TOKEN, "next": "//evil.example/x"})
    assert away.headers["Location"] == "/ops/"


def test_sign_in_sets_a_cookie_for_ops_only(client: FlaskClient) -> None:
    response = client.post("/ops/login", data={"token": API_TOKEN, "next": "/ops/suppressions"})
    cookie = response.headers["Set-Cookie"]
    assert "Path=/ops/" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert API_TOKEN not in cookie
    assert client.get("/ops/suppressions").status_code == 200


def test_bearer_header_works_for_scripts(client: FlaskClient, auth: dict[str, str]) -> None:
    assert client.get("/ops/", headers=auth).status_code == 200


def test_search_an_address_shows_mails_and_suppression_and_removes_it(
    app_ctx: Flask, client: FlaskClient, redis_client: Redis
) -> None:
    mail_id = send_email("ann@example.com", "Your receipt", "test", address="x").id
    deliverability.suppress("ann@example.com", suppression.HARD_BOUNCE, "smtp", "550 5.1.1 gone")
    signed_in(client)
    found = client.get("/ops/?q=Ann@Example.com")
    assert found.status_code == 302 and found.headers["Location"] == "/ops/address/ann@example.com"
    page = client.get("/ops/address/ann@example.com").get_data(as_text=True)
    assert "Your receipt" in page and f"/ops/mail/{mail_id}" in page
    assert "hard_bounce from smtp" in page and "550 5.1.1 gone" in page
    token = form_token(page)
    # Without the form token (another site's form): refused, nothing changes.
    forged = client.post("/ops/suppressions/remove", data={"email": "ann@example.com"})
    assert forged.status_code == 400
    assert suppression.get(redis_client, "ann@example.com") is not None
    data = {"email": "ann@example.com", "form_token": token, "next": "/ops/address/ann@example.com"}
    done = client.post("/ops/suppressions/remove", data=data, follow_redirects=True)
    assert "may be mailed again" in done.get_data(as_text=True)
    assert suppression.get(redis_client, "ann@example.com") is None
    assert client.get("/ops/?q=not-an-address").status_code == 200
    assert client.get(f"/ops/?q={mail_id.upper()}").headers["Location"] == f"/ops/mail/{mail_id}"


def test_a_failed_mail_shows_its_error_and_can_be_resent(
    app_ctx: Flask, client: FlaskClient, redis_client: Redis, smtp_server: SMTPServer,
    work: Any,
) -> None:  # fmt: skip
    smtp_server.handler.reply = "554 5.7.1 content refused"
    mail_id = send_email("ann@example.com", "Hello", "test", address="x").id
    work()
    assert status.load(redis_client, mail_id).status == status.FAILED  # type: ignore[union-attr]
    signed_in(client)
    page = client.get(f"/ops/mail/{mail_id}").get_data(as_text=True)
    assert "554 5.7.1 content refused" in page and "Re-send" in page
    smtp_server.handler.reply = None
    response = client.post(
        f"/ops/mail/{mail_id}/resend", data={"form_token": form_token(page)}, follow_redirects=True
    )
    assert "Queued again." in response.get_data(as_text=True)
    work()
    assert len(smtp_server.wait_for(1)) == 1
    assert status.load(redis_client, mail_id).status == status.SENT  # type: ignore[union-attr]
    assert "Re-send" not in client.get(f"/ops/mail/{mail_id}").get_data(as_text=True)
    assert client.get("/ops/mail/" + "0" * 32).status_code == 404


def test_the_suppression_list_adds_and_pages(client: FlaskClient, redis_client: Redis) -> None:
    signed_in(client)
    page = client.get("/ops/suppressions").get_data(as_text=True)
    token = form_token(page)
    for n in range(55):
        data = {"email": f"u{n}@example.com", "reason": "manual", "form_token": token}
        client.post("/ops/suppressions", data=data)
    bad = client.post(
        "/ops/suppressions",
        data={"email": "nonsense", "reason": "manual", "form_token": token},
        follow_redirects=True,
    )
    assert "Not suppressed" in bad.get_data(as_text=True)
    assert suppression.page(redis_client, 0, 100)[1] == 55
    first = client.get("/ops/suppressions").get_data(as_text=True)
    assert first.count('class="card entry"') == 50 and "/ops/suppressions?cursor=50" in first
    rest = client.get("/ops/suppressions?cursor=50").get_data(as_text=True)
    assert rest.count('class="card entry"') == 5
    assert suppression.get(redis_client, "u0@example.com").source == "api"  # type: ignore[union-attr]


def test_closed_when_no_api_token(env: dict[str, str], monkeypatch: Any) -> None:
    monkeypatch.delenv("API_TOKEN")
    client = create_app({"TESTING": True}).test_client()
    response = client.get("/ops/")
    assert response.status_code == 401 and b"this page is closed" in response.data
    assert client.post("/ops/login", data={"token": ""}).status_code == 401
