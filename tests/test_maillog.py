"""GET /api/mail?to=<address>: a recipient's latest mails, bounded, expiring."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from app import maillog
from app.mail import send_email, send_many
from tests.servers import SMTPServer


def test_the_log_after_60_mails_holds_the_latest_50_newest_first(
    app_ctx: Flask, client: FlaskClient, auth: dict[str, str], redis_client: Redis
) -> None:
    ids = [send_email("Ann <Ann@Example.com>", f"n{n}", "test", address="x").id for n in range(30)]
    ids += send_many([{"to": "ann@example.com", "subject": f"n{n}", "template": "test"}
                      for n in range(30, 60)])  # fmt: skip
    assert redis_client.zcard(maillog.log_key("ann@example.com")) == 50
    body = client.get("/api/mail?to=ANN@example.com", headers=auth).get_json()
    assert body["to"] == "ann@example.com" and body["suppression"] is None
    assert [mail["id"] for mail in body["mails"]] == ids[::-1][:50]
    newest = body["mails"][0]
    assert newest | {"created_at": ""} == {
        "id": ids[-1], "status": "queued", "template": "test", "subject": "n59", "created_at": "",
    }  # fmt: skip
    assert redis_client.ttl(maillog.log_key("ann@example.com")) > 0


def test_sent_failed_and_gone_mails_show_as_they_are(
    app_ctx: Flask, client: FlaskClient, auth: dict[str, str], redis_client: Redis,
    smtp_server: SMTPServer, work: Any,
) -> None:  # fmt: skip
    sent = send_email(["ann@example.com", "bob@example.com"], "one", "test", address="x").id
    work()
    smtp_server.wait_for(1)
    smtp_server.handler.reply = "554 5.7.1 content refused"
    failed = send_email("ann@example.com", "two", "test", address="x").id
    work()
    gone = send_email("ann@example.com", "three", "test", address="x").id
    redis_client.delete(f"mq:mail:{gone}")  # expired or purged
    mails = client.get("/api/mail?to=ann@example.com", headers=auth).get_json()["mails"]
    assert [m["id"] for m in mails] == [failed, sent]
    assert mails[0]["status"] == "failed" and "5.7.1" in mails[0]["error"] and mails[0]["failed_at"]
    assert mails[1]["status"] == "sent" and mails[1]["sent_at"]
    assert redis_client.zcard(maillog.log_key("ann@example.com")) == 2  # pruned on read
    bob = client.get("/api/mail?to=bob@example.com", headers=auth).get_json()["mails"]
    assert [m["id"] for m in bob] == [sent]


def test_bad_queries_name_the_parameter(client: FlaskClient, auth: dict[str, str]) -> None:
    for query, name in [("", "to"), ("?to=nobody", "to"), ("?to=a@example.com&x=1", "x")]:
        response = client.get(f"/api/mail{query}", headers=auth)
        assert response.status_code == 400 and response.get_json()["field"] == name
    assert client.get("/api/mail?to=a@example.com").status_code == 401
