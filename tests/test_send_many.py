"""send_many: the bulk form of send_email, same validation, one transaction."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from redis import Redis

from app import status
from app.errors import InvalidAddressError, InvalidMailError, TemplateNotFoundError
from app.mail import send_many
from app.queues import get_queue
from app.worker import AppWorker
from tests.servers import SMTPServer


def message(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "to": f"user{i}@example.com",
        "subject": f"Hello {i}",
        "template": "test",
        "context": {"address": f"User {i}"},
        **extra,
    }


def test_send_many_enqueues_in_order_and_the_worker_delivers_them(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, work: Callable[[], AppWorker]
) -> None:
    ids = send_many([message(i) for i in range(5)])

    assert len(set(ids)) == 5
    assert get_queue("mail").get_job_ids() == ids
    for mail_id in ids:
        record = status.load(redis_client, mail_id)
        assert record is not None and record.status == status.QUEUED
    work()
    received = smtp_server.wait_for(5)
    assert sorted(r.message_id for r in received) == sorted(f"<{i}@example.com>" for i in ids)
    assert {r.rcpt_tos[0] for r in received} == {f"user{i}@example.com" for i in range(5)}


def test_send_many_defers_what_has_a_send_at(app_ctx: Flask, redis_client: Redis) -> None:
    later = datetime.now(UTC) + timedelta(hours=2)
    now_id, later_id = send_many([message(0), message(1, send_at=later)])

    assert get_queue("mail").get_job_ids() == [now_id]
    record = status.load(redis_client, later_id)
    assert record is not None and record.status == status.SCHEDULED
    assert get_queue("mail").scheduled_job_registry.get_job_ids() == [later_id]


@pytest.mark.parametrize(
    ("bad", "error", "field"),
    [
        ({"to": "not an address"}, InvalidAddressError, "messages[1].to"),
        ({"template": "../etc/passwd"}, TemplateNotFoundError, "messages[1].template"),
        ({"subject": "a\r\nBcc: x@example.com"}, InvalidMailError, "messages[1].subject"),
        ({"reply_to": "x@example.com"}, InvalidMailError, "messages[1].reply_to"),
    ],
)
def test_one_bad_message_refuses_them_all_naming_it(
    app_ctx: Flask, redis_client: Redis, bad: dict[str, Any], error: type, field: str
) -> None:
    with pytest.raises(error) as caught:
        send_many([message(0), {**message(1), **bad}, message(2)])
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ": ")
    assert redis_client.dbsize() == 0


def test_a_missing_argument_is_named(app_ctx: Flask, redis_client: Redis) -> None:
    incomplete = message(0)
    del incomplete["subject"]
    with pytest.raises(InvalidMailError) as caught:
        send_many([incomplete])
    assert caught.value.field == "messages[0].subject"
    assert redis_client.dbsize() == 0


def test_bare_and_named_addresses_validate_alike(app_ctx: Flask, redis_client: Redis) -> None:
    ids = send_many(
        [
            message(0, to="Ann@EXAMPLE.com"),
            message(1, to="Ann Example <Ann@EXAMPLE.com>"),
            message(2, to=["bob@example.com", '"Carol, C." <carol@example.com>']),
        ]
    )
    records = [status.load(redis_client, mail_id) for mail_id in ids]
    assert [r.to for r in records if r is not None] == [
        ["Ann@example.com"],
        ["Ann Example <Ann@example.com>"],
        ["bob@example.com", '"Carol, C." <carol@example.com>'],
    ]
