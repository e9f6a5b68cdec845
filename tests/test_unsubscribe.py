"""Unsubscribe: GET asks and changes nothing, POST (one-click or the form) unsubscribes,
and a token that is not ours gets a 404 page that reveals nothing."""

from __future__ import annotations

import base64

import pytest
from flask import Flask
from flask.testing import FlaskClient
from itsdangerous import URLSafeSerializer
from redis import Redis

from app import digests

ANN = "ann@example.com"


@pytest.fixture
def token(app_ctx: Flask) -> str:
    digests.upsert_subscriber(ANN, "Europe/Berlin", "daily", 8)
    digests.upsert_subscriber("bob@example.com", "Europe/Berlin", "daily", 8)
    return digests.unsubscribe_token(ANN)


def frequency(email: str = ANN) -> str:
    sub = digests.get_subscriber(email)
    assert sub is not None
    return sub.schedule.frequency


def test_get_shows_a_confirm_page_and_changes_nothing(
    client: FlaskClient, token: str, redis_client: Redis
) -> None:
    before = redis_client.hgetall(digests.sub_key(ANN))
    for _ in range(3):  # link scanners fetch more than once
        response = client.get(f"/unsubscribe/{token}")
        assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert '<form method="post"' in page and "a***@example.com" in page
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert redis_client.hgetall(digests.sub_key(ANN)) == before
    assert redis_client.zscore(digests.DUE_KEY, ANN) is not None


def test_one_click_post_unsubscribes(client: FlaskClient, token: str, redis_client: Redis) -> None:
    response = client.post(
        f"/unsubscribe/{token}",
        data="List-Unsubscribe=One-Click",
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 200
    assert "unsubscribed" in response.get_data(as_text=True)
    assert frequency() == "off"
    assert redis_client.zscore(digests.DUE_KEY, ANN) is None
    assert frequency("bob@example.com") == "daily"
    # Again, or after the subscriber is gone: still 200, nothing re-created.
    assert client.post(f"/unsubscribe/{token}").status_code == 200
    digests.delete_subscriber(ANN)
    assert client.post(f"/unsubscribe/{token}").status_code == 200
    assert redis_client.exists(digests.sub_key(ANN)) == 0


def test_the_confirm_page_form_unsubscribes(client: FlaskClient, token: str) -> None:
    page = client.get(f"/unsubscribe/{token}").get_data(as_text=True)
    action = page.split('action="', 1)[1].split('"', 1)[0]
    assert action == f"/unsubscribe/{token}"
    assert client.post(action, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert frequency() == "off"


def _tampered(token: str) -> list[str]:
    payload, _, signature = token.partition(".")
    bob_payload = base64.urlsafe_b64encode(b'"bob@example.com"').rstrip(b"=").decode()
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    return [
        f"{payload}.{flipped}",  # signature altered
        f"{bob_payload}.{signature}",  # payload swapped for another subscriber's
        payload,  # signature removed
        URLSafeSerializer("another-key", salt=digests.UNSUBSCRIBE_SALT).dumps(ANN),
        URLSafeSerializer("test-secret-key", salt="some-other-purpose").dumps(ANN),
        "x" * 2000,
    ]


@pytest.mark.parametrize("case", range(6))
def test_a_tampered_token_gets_a_404_page_that_reveals_nothing(
    client: FlaskClient, token: str, case: int
) -> None:
    bad = _tampered(token)[case]
    for response in (client.get(f"/unsubscribe/{bad}"), client.post(f"/unsubscribe/{bad}")):
        assert response.status_code == 404
        page = response.get_data(as_text=True)
        assert "not valid" in page
        assert "example.com" not in page and "bob" not in page
    assert frequency() == "daily" and frequency("bob@example.com") == "daily"


def test_tokens_are_per_subscriber(app_ctx: Flask) -> None:
    ann, bob = digests.unsubscribe_token(ANN), digests.unsubscribe_token("bob@example.com")
    assert ann != bob
    assert digests.read_unsubscribe_token(ann) == ANN
    assert digests.read_unsubscribe_token(bob) == "bob@example.com"
