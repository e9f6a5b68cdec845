"""Hostile and wrong input to the new mail fields, and idempotency keys (issue 15): each
refusal a ValueError naming the field, a 4xx JSON from the API, nothing in Redis."""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from app import status
from app.errors import IdempotencyConflictError, InvalidMailError
from app.mail import MAX_ATTACHMENTS, Attachment, send_email, send_many
from tests.servers import SMTPServer

BASE: dict[str, Any] = {"to": "ann@example.com", "subject": "Hi", "template": "test"}

REFUSED = [
    ({"cc": ["ok@example.com", "bad"]}, "cc[1]"),
    ({"cc": "x@example.com\r\nBcc: evil@example.com"}, "cc"),
    ({"bcc": ["a@example.com\x00"]}, "bcc[0]"),
    ({"reply_to": "no address"}, "reply_to"),
    ({"reply_to": ["a@example.com", "b@example.com\n"]}, "reply_to[1]"),
    ({"headers": {"X-Foo": "a\r\nBcc: evil@example.com"}}, "headers.X-Foo"),
    ({"headers": {"X-Foo": "nul\x00"}}, "headers.X-Foo"),
    ({"headers": {"Bcc": "evil@example.com"}}, "headers.Bcc"),
    ({"headers": {"content-type": "text/html"}}, "headers.content-type"),
    ({"headers": {"Content-Disposition": "inline"}}, "headers.Content-Disposition"),
    ({"headers": {"X Bad": "x"}}, "headers"),
    (
        {
            "attachments": [
                {"filename": "ok.txt", "content": "YQ=="},
                {"filename": "../x", "content": "YQ=="},
            ]
        },
        "attachments[1].filename",
    ),
    ({"attachments": [{"filename": "a\r\nb.txt", "content": "YQ=="}]}, "attachments[0].filename"),
    ({"attachments": [{"filename": "a\x00.txt", "content": "YQ=="}]}, "attachments[0].filename"),
    ({"attachments": [{"filename": "a.txt", "content": "not base64!"}]}, "attachments[0].content"),
    ({"attachments": [{"filename": "a.txt", "content": "YQ="}]}, "attachments[0].content"),
    (
        {
            "attachments": [
                {"filename": "a.txt", "content": "YQ==", "content_type": "text/plain\r\nX: y"}
            ]
        },
        "attachments[0].content_type",
    ),
    (
        {"attachments": [{"filename": "a.txt", "content": "YQ==", "content_id": "<x>"}]},
        "attachments[0].content_id",
    ),
    (
        {"attachments": [{"filename": "a.txt", "content": "YQ==", "secret": 1}]},
        "attachments[0].secret",
    ),
    ({"tags": ["Upper"]}, "tags[0]"),
    ({"tags": "one"}, "tags"),
    ({"metadata": {"n": 1}}, "metadata.n"),
    ({"metadata": {"n": "line\nbreak"}}, "metadata.n"),
    ({"locale": "xx_YY"}, "locale"),
    ({"locale": "../de"}, "locale"),
]


@pytest.mark.parametrize(("extra", "field"), REFUSED)
def test_python_refuses_naming_the_field_and_writes_nothing(
    app_ctx: Flask, redis_client: Redis, extra: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidMailError) as caught:
        send_email(**BASE, **extra)
    assert isinstance(caught.value, ValueError)
    assert caught.value.field == field
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize(("extra", "field"), REFUSED)
def test_the_api_refuses_naming_the_field_and_writes_nothing(
    client: FlaskClient,
    auth: dict[str, str],
    redis_client: Redis,
    extra: dict[str, Any],
    field: str,
) -> None:
    response = client.post("/api/mail", json={**BASE, **extra}, headers=auth)
    assert response.status_code == 400
    assert response.get_json()["field"] == field
    assert redis_client.dbsize() == 0


def test_send_many_prefixes_the_index(app_ctx: Flask, redis_client: Redis) -> None:
    with pytest.raises(InvalidMailError) as caught:
        send_many([BASE, {**BASE, "cc": ["x@example.com", "nope"]}])
    assert caught.value.field == "messages[1].cc[1]"
    assert redis_client.dbsize() == 0


def test_cc_and_bcc_count_in_max_recipients(app: Flask, redis_client: Redis) -> None:
    app.config["MAIL_MAX_RECIPIENTS"] = 3
    with app.app_context(), pytest.raises(InvalidMailError) as caught:
        send_email(**BASE, cc=["b@example.com", "c@example.com"], bcc="d@example.com")
    assert caught.value.field == "bcc"
    assert redis_client.dbsize() == 0


def test_the_attachment_cap_counts_decoded_bytes_of_all(
    app: Flask, client: FlaskClient, auth: dict[str, str], redis_client: Redis
) -> None:
    app.config["MAIL_MAX_ATTACHMENT_BYTES"] = 1000
    with app.app_context():
        send_email(**BASE, attachments=[Attachment("a.bin", b"x" * 1000)])  # at the cap
        redis_client.flushall()
        with pytest.raises(InvalidMailError) as caught:
            send_email(
                **BASE, attachments=[Attachment("a", b"x" * 600), Attachment("b", b"y" * 401)]
            )
    assert caught.value.field == "attachments[1]"
    over = base64.b64encode(b"x" * 1001).decode()
    response = client.post(
        "/api/mail",
        json={**BASE, "attachments": [{"filename": "a", "content": over}]},
        headers=auth,
    )
    assert response.status_code == 400
    assert response.get_json()["field"] == "attachments[0]"
    assert redis_client.dbsize() == 0


def test_a_request_at_the_default_cap_fits_the_body_limit(
    client: FlaskClient, auth: dict[str, str], app: Flask, redis_client: Redis
) -> None:
    data = b"\x00" * app.config["MAIL_MAX_ATTACHMENT_BYTES"]
    body = {
        **BASE,
        "attachments": [{"filename": "big.bin", "content": base64.b64encode(data).decode()}],
    }
    response = client.post("/api/mail", json=body, headers=auth)
    assert response.status_code == 202, response.get_json()
    stored = redis_client.get(status.attachments_key(response.get_json()["id"]))
    assert stored == data


def test_a_thousand_tiny_attachments_are_delivered_and_one_more_refused(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any, redis_client: Redis
) -> None:
    files = [Attachment(f"f{i}.txt", str(i).encode()) for i in range(MAX_ATTACHMENTS)]
    with pytest.raises(InvalidMailError) as caught:
        send_email(**BASE, attachments=[*files, Attachment("one-more.txt", b"x")])
    assert caught.value.field == "attachments"
    started = time.monotonic()
    send_email(**BASE, attachments=files)
    work()
    [received] = smtp_server.wait_for(1)
    assert time.monotonic() - started < 30
    parts = list(received.message.iter_attachments())
    assert len(parts) == MAX_ATTACHMENTS
    assert parts[999].get_filename() == "f999.txt"
    assert parts[999].get_content() == "999"


def test_the_same_key_and_body_replays_and_another_body_is_409(
    client: FlaskClient, auth: dict[str, str], redis_client: Redis
) -> None:
    headers = {**auth, "Idempotency-Key": "order-42/confirmation"}
    first = client.post("/api/mail", json=BASE, headers=headers)
    assert first.status_code == 202
    assert "Idempotent-Replayed" not in first.headers
    keys = redis_client.dbsize()
    again = client.post("/api/mail", json=BASE, headers=headers)
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    assert redis_client.dbsize() == keys  # nothing new queued
    other = client.post("/api/mail", json={**BASE, "subject": "Other"}, headers=headers)
    assert other.status_code == 409
    assert other.get_json()["field"] == "Idempotency-Key"
    assert redis_client.dbsize() == keys  # the conflict wrote nothing
    bad = client.post("/api/mail", json=BASE, headers={**auth, "Idempotency-Key": "é"})
    assert bad.status_code == 400
    assert bad.get_json()["field"] == "Idempotency-Key"


def test_python_idempotency_key_and_its_ttl(app: Flask, redis_client: Redis) -> None:
    app.config["MAIL_IDEMPOTENCY_TTL"] = 60
    with app.app_context():
        first = send_email(**BASE, idempotency_key="k1")
        assert send_email(**BASE, idempotency_key="k1").id == first.id
        assert (
            send_many(
                [
                    {**BASE, "idempotency_key": "k1"},
                    {**BASE, "idempotency_key": "k2"},
                    {**BASE, "idempotency_key": "k2"},
                ]
            )[0]
            == first.id
        )
        with pytest.raises(IdempotencyConflictError) as caught:
            send_email(**BASE, idempotency_key="k1", tags=["other"])
        assert caught.value.field == "idempotency_key"
    [key] = [k for k in redis_client.scan_iter("mq:idem:*") if redis_client.ttl(k) > 0][:1]
    assert 0 < redis_client.ttl(key) <= 60
    assert len(list(redis_client.scan_iter("mq:mail:*"))) == 2  # k1's and k2's mails


def test_racing_requests_with_one_key_make_one_mail(app: Flask, redis_client: Redis) -> None:
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def send() -> None:
        with app.app_context():
            barrier.wait()
            ids.append(send_email(**BASE, idempotency_key="race").id)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(ids) == 8 and len(set(ids)) == 1
    assert list(redis_client.scan_iter("mq:mail:*")) == [status.key(ids[0]).encode()]
    assert redis_client.llen("rq:queue:mail") == 1


def test_racing_api_requests_with_one_key_make_one_mail_and_replay_the_rest(
    app: Flask, auth: dict[str, str], redis_client: Redis
) -> None:
    """Requests of one body under one key, sent at once (a client's retries racing its
    first try): one 202 that queued the mail, the rest replays of its id."""
    headers = {**auth, "Idempotency-Key": "checkout-7"}
    answers: list[tuple[int, str, str | None]] = []
    barrier = threading.Barrier(6)

    def post() -> None:
        client = app.test_client()
        barrier.wait()
        response = client.post("/api/mail", json=BASE, headers=headers)
        answers.append(
            (
                response.status_code,
                response.get_json()["id"],
                response.headers.get("Idempotent-Replayed"),
            )
        )

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(answers) == 6
    assert {code for code, _, _ in answers} == {202}
    assert len({mail_id for _, mail_id, _ in answers}) == 1
    assert sorted(str(replayed) for _, _, replayed in answers) == ["None"] + ["true"] * 5
    assert len(list(redis_client.scan_iter("mq:mail:*"))) == 1
    assert redis_client.llen("rq:queue:mail") == 1


def test_racing_api_requests_with_one_key_and_two_bodies_one_wins_one_409(
    app: Flask, auth: dict[str, str], redis_client: Redis
) -> None:
    headers = {**auth, "Idempotency-Key": "checkout-8"}
    codes: dict[str, int] = {}
    barrier = threading.Barrier(2)

    def post(subject: str) -> None:
        client = app.test_client()
        barrier.wait()
        response = client.post("/api/mail", json={**BASE, "subject": subject}, headers=headers)
        codes[subject] = response.status_code
        if response.status_code == 409:
            assert response.get_json()["field"] == "Idempotency-Key"

    threads = [threading.Thread(target=post, args=(subject,)) for subject in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(codes.values()) == [202, 409]
    assert len(list(redis_client.scan_iter("mq:mail:*"))) == 1  # the loser wrote nothing
    assert redis_client.llen("rq:queue:mail") == 1
