"""A digest subscriber's `locale` (issue 15): kept by PUT, shown by GET, and the digest
renders from email/digest.de.* under the German locale, on the wire."""

from __future__ import annotations

from typing import Any

import time_machine
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from app import digests
from tests.digest_helpers import utc
from tests.servers import SMTPServer

URL = "/api/subscribers/ann@example.com"


def test_put_keeps_the_locale_and_a_put_without_it_clears_it(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    body = {"timezone": "Europe/Berlin", "frequency": "daily", "locale": "de"}
    assert client.put(URL, json=body, headers=auth).status_code == 201
    assert client.get(URL, headers=auth).get_json()["locale"] == "de"
    del body["locale"]
    assert client.put(URL, json=body, headers=auth).status_code == 200
    assert client.get(URL, headers=auth).get_json()["locale"] is None


def test_an_unknown_locale_is_400_naming_it_and_writes_nothing(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis
) -> None:
    for locale in ("xx_YY", "../de", 7):
        body = {"timezone": "UTC", "frequency": "daily", "locale": locale}
        response = client.put(URL, json=body, headers=auth)
        assert response.status_code == 400, locale
        assert response.get_json()["field"] == "locale"
    assert redis_client.dbsize() == 0


def test_an_unsubscribe_keeps_the_locale(app_ctx: Flask) -> None:
    digests.upsert_subscriber("ann@example.com", "UTC", "daily", locale="de")
    assert digests.unsubscribe("ann@example.com")
    subscriber = digests.get_subscriber("ann@example.com")
    assert subscriber is not None and subscriber.locale == "de"


def test_a_german_subscriber_gets_the_german_digest_on_the_wire(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any
) -> None:
    with time_machine.travel(utc("2026-11-27T05:00"), tick=False):
        digests.upsert_subscriber("ann@example.com", "Europe/Berlin", "daily", locale="de")
        digests.upsert_subscriber("bob@example.com", "Europe/Berlin", "daily")
        for email in ("ann@example.com", "bob@example.com"):
            digests.add_item(email, "Neuer Kommentar")
    with time_machine.travel(utc("2026-11-27T07:01"), tick=False):
        digests.dispatch_due()
        work()
    by_rcpt = {r.rcpt_tos[0]: r for r in smtp_server.wait_for(2)}
    german = by_rcpt["ann@example.com"]
    assert german.message["Subject"] == "[Example] Ihre tägliche Übersicht: 1 neuer Eintrag"
    text = german.part("text/plain")
    assert "Freitag, 27. November 2026: 1 neuer Eintrag" in text
    assert "* Neuer Kommentar (Fr. 27. Nov., 06:00)" in text  # Berlin time, in German
    assert "Abbestellen:" in text
    assert "Ihre tägliche Übersicht" in german.part("text/html")
    english = by_rcpt["bob@example.com"]
    assert english.message["Subject"] == "[Example] Your daily digest: 1 new item"
    assert "Friday 27 November 2026" in english.part("text/plain")
