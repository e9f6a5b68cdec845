"""The subscriber and item API: status codes, validation naming the field, no partial writes."""

from __future__ import annotations

from typing import Any

import pytest
import time_machine
from flask.testing import FlaskClient
from redis import Redis

from app import digests
from tests.digest_helpers import utc

URL = "/api/subscribers/ann@example.com"


def put(client: FlaskClient, auth: dict[str, str], body: Any, url: str = URL) -> Any:
    return client.put(url, json=body, headers=auth)


def test_put_creates_then_updates_and_get_shows_it(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    with time_machine.travel(utc("2026-11-27T05:00"), tick=False):
        created = put(client, auth, {"timezone": "Europe/Berlin", "frequency": "daily"})
        assert created.status_code == 201
        body = created.get_json()
        assert body["email"] == "ann@example.com"
        assert (body["timezone"], body["frequency"], body["hour"], body["weekday"]) == (
            "Europe/Berlin",
            "daily",
            8,
            "monday",
        )
        assert body["next_due"] == "2026-11-27T07:00:00+00:00"
        assert body["pending_items"] == 0
        updated = put(
            client,
            auth,
            {"timezone": "Asia/Tokyo", "frequency": "weekly", "hour": 0, "weekday": "Sunday"},
        )
        assert updated.status_code == 200
        shown = client.get(URL, headers=auth).get_json()
    assert (shown["timezone"], shown["frequency"], shown["hour"], shown["weekday"]) == (
        "Asia/Tokyo",
        "weekly",
        0,
        "sunday",
    )
    assert shown["next_due"] == "2026-11-28T15:00:00+00:00"  # Sunday 00:00 in Tokyo


def test_weekday_on_a_daily_subscriber_is_accepted_and_kept(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    response = put(client, auth, {"timezone": "UTC", "frequency": "daily", "weekday": "friday"})
    assert response.status_code == 201 and response.get_json()["weekday"] == "friday"


def test_items_are_accepted_for_known_subscribers_only(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis
) -> None:
    items = URL + "/items"
    missing = client.post(items, json={"title": "Hi"}, headers=auth)
    assert missing.status_code == 404 and missing.get_json()["field"] == "email"
    put(client, auth, {"timezone": "UTC", "frequency": "daily"})
    accepted = client.post(
        items,
        json={"title": "Hi", "url": "https://example.com/x", "body": "b", "kind": "news"},
        headers=auth,
    )
    assert accepted.status_code == 202
    assert accepted.get_json() == {"status": "queued", "pending_items": 1}
    assert client.get(URL, headers=auth).get_json()["pending_items"] == 1
    put(client, auth, {"timezone": "UTC", "frequency": "off"})
    discarded = client.post(items, json={"title": "Hi"}, headers=auth)
    assert discarded.status_code == 202 and discarded.get_json()["status"] == "discarded"
    assert redis_client.llen(digests.items_key("ann@example.com")) == 1


def test_delete_forgets_and_then_404s(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis
) -> None:
    put(client, auth, {"timezone": "UTC", "frequency": "daily"})
    client.post(URL + "/items", json={"title": "Hi"}, headers=auth)
    assert client.delete(URL, headers=auth).status_code == 204
    assert redis_client.keys("*ann@example.com*") == []
    assert redis_client.zcard(digests.DUE_KEY) == 0
    gone = client.get(URL, headers=auth)
    assert gone.status_code == 404 and gone.get_json()["field"] == "email"
    assert client.delete(URL, headers=auth).status_code == 404


def test_an_address_with_a_slash_works_percent_encoded_in_the_path(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis
) -> None:
    """'/' is valid in a local part (RFC 5322 atext); the client encodes it as %2F,
    which reaches the routes decoded."""
    url = "/api/subscribers/team%2Fops@example.com"
    assert put(client, auth, {"timezone": "UTC", "frequency": "daily"}, url=url).status_code == 201
    added = client.post(url + "/items", json={"title": "Hi"}, headers=auth)
    assert added.status_code == 202 and added.get_json()["pending_items"] == 1
    shown = client.get(url, headers=auth).get_json()
    assert (shown["email"], shown["pending_items"]) == ("team/ops@example.com", 1)
    assert client.delete(url, headers=auth).status_code == 204
    assert redis_client.keys("*team/ops@example.com*") == []
    # The items collection takes POST only (RFC 9110: 405 with Allow).
    for method in ("GET", "PUT", "DELETE"):
        wrong = client.open("/api/subscribers/ann@example.com/items", method=method, headers=auth)
        assert wrong.status_code == 405, method
        assert set(wrong.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"timezone": "Mars/Olympus", "frequency": "daily"}, "timezone"),
        ({"timezone": "localtime", "frequency": "daily"}, "timezone"),
        ({"timezone": 5, "frequency": "daily"}, "timezone"),
        ({"frequency": "daily"}, "timezone"),
        ({"timezone": "UTC"}, "frequency"),
        ({"timezone": "UTC", "frequency": "hourly"}, "frequency"),
        ({"timezone": "UTC", "frequency": "daily", "hour": 24}, "hour"),
        ({"timezone": "UTC", "frequency": "daily", "hour": -1}, "hour"),
        ({"timezone": "UTC", "frequency": "daily", "hour": "8"}, "hour"),
        ({"timezone": "UTC", "frequency": "daily", "hour": 8.5}, "hour"),
        ({"timezone": "UTC", "frequency": "daily", "hour": True}, "hour"),
        ({"timezone": "UTC", "frequency": "weekly", "weekday": "funday"}, "weekday"),
        ({"timezone": "UTC", "frequency": "weekly", "weekday": 1}, "weekday"),
        ({"timezone": "UTC", "frequency": "daily", "colour": "red"}, "colour"),
    ],
)
def test_put_refuses_bad_input_naming_the_field_and_writes_nothing(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis, body: Any, field: str
) -> None:
    response = put(client, auth, body)
    assert response.status_code == 400
    assert response.get_json()["field"] == field
    assert field in response.get_json()["error"]
    assert redis_client.keys("*") == []


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/subscribers/not-an-address", "email"),
        ("/api/subscribers/Ann <ann@example.com>", "email"),
        ("/api/subscribers/ann@example", "email"),
        ("/api/subscribers/" + "a" * 250 + "@example.com", "email"),
    ],
)
def test_bad_addresses_are_400_naming_email(
    client: FlaskClient, auth: dict[str, str], url: str, field: str
) -> None:
    response = put(client, auth, {"timezone": "UTC", "frequency": "daily"}, url=url)
    assert response.status_code == 400 and response.get_json()["field"] == field
    assert client.get(url, headers=auth).status_code == 400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "title"),
        ({"title": ""}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": ["list"]}, "title"),
        ({"title": "ok", "url": "javascript:alert(1)"}, "url"),
        ({"title": "ok", "url": 7}, "url"),
        ({"title": "ok", "body": "b" * 2001}, "body"),
        ({"title": "ok", "kind": "Not A Kind"}, "kind"),
        ({"title": "ok", "extra": 1}, "extra"),
    ],
)
def test_items_refuse_bad_input_naming_the_field(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis, body: Any, field: str
) -> None:
    put(client, auth, {"timezone": "UTC", "frequency": "daily"})
    response = client.post(URL + "/items", json=body, headers=auth)
    assert response.status_code == 400 and response.get_json()["field"] == field
    assert redis_client.llen(digests.items_key("ann@example.com")) == 0


def test_bodies_that_are_not_json_objects(client: FlaskClient, auth: dict[str, str]) -> None:
    assert client.put(URL, data="x", headers=auth).status_code == 415
    not_json = client.put(URL, data="{", headers={**auth, "Content-Type": "application/json"})
    assert not_json.status_code == 400
    assert put(client, auth, ["timezone"]).status_code == 400


def test_the_subscriber_api_needs_the_token(client: FlaskClient) -> None:
    assert client.put(URL, json={"timezone": "UTC", "frequency": "daily"}).status_code == 401
    assert client.get(URL).status_code == 401
    assert client.post(URL + "/items", json={"title": "x"}).status_code == 401
