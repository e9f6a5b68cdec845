"""send_many: the bulk form of send_email, same validation, one transaction."""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from flask import Flask
from redis import Redis
from rq import Retry
from rq.job import Job
from rq.utils import str_to_date

from app import status
from app.errors import (
    InvalidAddressError,
    InvalidMailError,
    QueueUnavailableError,
    TemplateNotFoundError,
)
from app.mail import DELIVER_JOB, send_email, send_many
from app.mail import enqueueing as mail
from app.queues import get_queue
from app.worker import AppWorker
from tests.helpers import failing_pipelines
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
        ({"importance": "high"}, InvalidMailError, "messages[1].importance"),
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


def test_each_job_hash_is_the_one_rq_itself_writes(app_ctx: Flask, redis_client: Redis) -> None:
    # send_many writes jobs after the first by editing the first one's hash (see
    # app.mail._write_queued); each must read back exactly as RQ's own would.
    ids = send_many([message(i, template="test" if i % 2 else "digest") for i in range(4)])
    queue = get_queue("mail")
    config = app_ctx.config
    jitters = {redis_client.hget(f"rq:job:{mail_id}", "retry_intervals") for mail_id in ids}
    assert len(jitters) == len(ids)  # each mail its own jitter (app.mail.retry_policy)
    for mail_id in ids:
        ours = redis_client.hgetall(f"rq:job:{mail_id}")
        job = queue.create_job(
            DELIVER_JOB,
            args=(mail_id,),
            job_id=mail_id,
            timeout=config["MAIL_JOB_TIMEOUT"],
            result_ttl=0,
            failure_ttl=config["MAIL_STATUS_TTL"],
            retry=Retry(
                max=len(config["MAIL_RETRY_INTERVALS"]),
                interval=json.loads(ours[b"retry_intervals"]),
            ),
            description=f"mail {status.load(redis_client, mail_id).template}",  # type: ignore[union-attr]
        )
        queue._prepare_for_queue(job)  # what Queue.enqueue_job does before saving it
        job.created_at = str_to_date(ours[b"created_at"])
        job.enqueued_at = str_to_date(ours[b"enqueued_at"])
        redis_client.hset("expected", mapping=job.to_dict())
        expected = redis_client.hgetall("expected")
        assert zlib.decompress(ours.pop(b"data")) == zlib.decompress(expected.pop(b"data"))
        assert ours == expected
        fetched = Job.fetch(mail_id, connection=redis_client, serializer=queue.serializer)
        assert (fetched.func_name, fetched.args, fetched.kwargs) == (DELIVER_JOB, [mail_id], {})


def test_each_record_is_the_one_status_create_writes(app_ctx: Flask, redis_client: Redis) -> None:
    with time_machine.travel(datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC), tick=False):
        ids = send_many([message(i, to=[f"a{i}@example.com", "B <b@x.com>"]) for i in range(3)])
        for mail_id in ids:
            written = redis_client.hgetall(status.key(mail_id))
            record = status.MailRecord.from_redis(written)
            assert record.created_at == record.updated_at == "2030-01-02T03:04:05.678+00:00"
            with redis_client.pipeline() as pipe:
                pipe.delete(status.key(mail_id))
                status.create(pipe, record)
                pipe.execute()
            assert redis_client.hgetall(status.key(mail_id)) == written


def test_a_mixed_batch_over_several_scripts_keeps_its_order(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mail, "_BULK_CHUNK", 2)
    later = datetime.now(UTC) + timedelta(hours=2)
    batch = [message(i) for i in range(6)]
    batch[0]["send_at"] = later  # the first one's job is not the one the others are built from
    batch[3]["delay"] = 3600
    ids = send_many(batch)

    now_ids = [ids[i] for i in (1, 2, 4, 5)]
    queue = get_queue("mail")
    assert queue.get_job_ids() == now_ids
    assert sorted(queue.scheduled_job_registry.get_job_ids()) == sorted([ids[0], ids[3]])
    work()
    received = smtp_server.wait_for(4)
    assert sorted(r.message_id for r in received) == sorted(f"<{i}@example.com>" for i in now_ids)
    for mail_id in now_ids:
        assert status.load(redis_client, mail_id).status == status.SENT  # type: ignore[union-attr]


def test_send_email_still_returns_its_job(app_ctx: Flask, redis_client: Redis) -> None:
    job = send_email("ann@example.com", "Hi", "test")
    assert redis_client.lrange("rq:queue:mail", 0, -1) == [job.id.encode()]
    fetched = Job.fetch(job.id, connection=redis_client, serializer=get_queue("mail").serializer)
    assert fetched.retry_intervals == job.retry_intervals
    assert fetched.description == job.description == "mail test"


def test_redis_down_writes_nothing(
    app_ctx: Flask, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    with failing_pipelines(monkeypatch), pytest.raises(QueueUnavailableError, match="not queued"):
        send_many([message(i) for i in range(3)])
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize("size", [0, 1, 75, 1000, 30000, 65535, 70000])
def test_job_data_is_a_valid_zlib_stream(size: int) -> None:
    data = os.urandom(size)
    if size <= 30000:
        assert mail._zlib_stored(data) == zlib.compress(data, 0)
    assert zlib.decompress(mail._zlib_stored(data)) == data
