"""AppWorker's lean job handling (app/leanworker.py) leaves RQ's state as RQ would."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.exceptions
from flask import Flask
from redis import Redis
from rq import Queue, get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

import jobs.mail
from app import leanworker, scripts, status
from app.mail import send_email
from app.worker import AppWorker
from tests.helpers import counting_redis_writes
from tests.servers import SMTPServer


@pytest.fixture(autouse=True)
def _one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """These are tests of the one-at-a-time worker's batches (MAIL_CONCURRENCY=1); the
    worker with mails in flight (app/inflight.py) has tests/test_inflight.py."""
    monkeypatch.setenv("MAIL_CONCURRENCY", "1")


def queue(redis: Redis, name: str = "mail") -> Queue:
    return Queue(name, connection=redis, serializer=JSONSerializer)


def rq_leftovers(redis: Redis) -> list[bytes]:
    """Keys RQ keeps per job or execution; none may outlive a successful job."""
    patterns = ("rq:job:*", "rq:execution:*", "rq:executions:*", "rq:results:*")
    return sorted(key for pattern in patterns for key in redis.scan_iter(pattern))


def test_a_batch_delivers_everything_and_leaves_no_rq_state(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, work: Callable[[], AppWorker]
) -> None:
    count = leanworker.BATCH_SIZE * 2 + 3  # two full batches and a short one
    ids = [send_email(f"user{i}@example.com", f"Hello {i}", "test").id for i in range(count)]
    worker = work()

    received = smtp_server.wait_for(count)
    assert sorted(r.message_id for r in received) == sorted(f"<{i}@example.com>" for i in ids)
    for mail_id in ids:
        assert status.load(redis_client, mail_id).status == status.SENT  # type: ignore[union-attr]
    q = queue(redis_client)
    assert q.count == 0
    assert redis_client.llen(q.intermediate_queue_key) == 0
    assert q.started_job_registry.count == 0
    assert q.failed_job_registry.count == 0
    assert rq_leftovers(redis_client) == []
    stats = redis_client.hgetall(worker.key)
    assert int(stats[b"successful_job_count"]) == count


def test_a_batched_mail_costs_one_redis_round_trip(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one that records the previous mail `sent` (with its job's success) and starts
    this mail's job (with its attempt claim)."""
    count = leanworker.BATCH_SIZE * 8
    for i in range(count):
        send_email(f"user{i}@example.com", "Hi", "test")
    with counting_redis_writes(monkeypatch) as sends:
        work(("mail", "digests"))  # the fixed cost (start, maintenance) grows with queues
    assert len(smtp_server.wait_for(count)) == count
    # Besides 1 a mail: per batch a pop, a claim and the end (24); the worker's start,
    # maintenance pass and stop (~60). A second round trip per mail would add 128.
    assert count <= len(sends) <= count + 100


def test_a_failure_inside_a_batch_goes_through_rqs_failure_path(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, work: Callable[[], AppWorker]
) -> None:
    smtp_server.handler.refuse_rcpt = {"bad@example.com": "550 5.1.1 no such user"}
    good = [send_email(f"user{i}@example.com", "Hi", "test").id for i in range(3)]
    bad = send_email("bad@example.com", "Hi", "test").id
    good += [send_email(f"later{i}@example.com", "Hi", "test").id for i in range(3)]
    work()

    assert len(smtp_server.wait_for(len(good))) == len(good)
    for mail_id in good:
        assert status.load(redis_client, mail_id).status == status.SENT  # type: ignore[union-attr]
    record = status.load(redis_client, bad)
    assert record is not None and record.status == status.FAILED
    q = queue(redis_client)
    assert q.failed_job_registry.get_job_ids() == [bad]
    assert q.started_job_registry.count == 0
    assert redis_client.llen(q.intermediate_queue_key) == 0


def test_a_warm_shutdown_mid_batch_puts_the_unstarted_jobs_back_in_order(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [send_email(f"user{i}@example.com", "Hi", "test").id for i in range(6)]
    worker = AppWorker(["mail", "digests"])
    original = jobs.mail.deliver
    calls: list[str] = []

    def deliver_then_stop(mail_id: str) -> Any:
        calls.append(mail_id)
        if len(calls) == 2:
            worker._stop_requested = True  # what SIGTERM does while a job runs
        return original(mail_id)

    monkeypatch.setattr(jobs.mail, "deliver", deliver_then_stop)
    worker.work(burst=True, logging_level="WARNING")

    assert calls == ids[:2]
    assert len(smtp_server.wait_for(2)) == 2
    q = queue(redis_client)
    assert q.get_job_ids() == ids[2:]
    assert q.started_job_registry.count == 0
    assert redis_client.llen(q.intermediate_queue_key) == 0
    for job_id in ids[2:]:
        assert (
            Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer).get_status()
            == "queued"
        )
        assert status.load(redis_client, job_id).status == status.QUEUED  # type: ignore[union-attr]

    # The next worker sends them, once each.
    AppWorker(["mail", "digests"]).work(burst=True, logging_level="WARNING")
    received = smtp_server.wait_for(6)
    assert sorted(r.message_id for r in received) == sorted(f"<{i}@example.com>" for i in ids)


def test_a_batch_and_maintenance_never_queue_a_claimed_job_twice(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass saw claimed jobs waiting behind a slow one: its mark goes when the job
    starts, and one it put back (as stranded) is not pushed again by the batch."""
    ids = [send_email(f"user{i}@example.com", "Hi", "test").id for i in range(6)]
    worker = AppWorker(["mail", "digests"])
    q = queue(redis_client)
    seen = q.intermediate_queue.get_first_seen_key
    original = jobs.mail.deliver
    calls: list[str] = []

    def deliver_slowly(mail_id: str) -> Any:
        calls.append(mail_id)
        if len(calls) == 1:
            redis_client.set(seen(ids[1]), 1)  # a pass saw ids[1] waiting
        if len(calls) == 2:
            keys = (q.intermediate_queue_key, q.key, seen(ids[3]))
            assert redis_client.eval(scripts.PUT_BACK, 3, *keys, ids[3]) == 1
            worker._stop_requested = True
        return original(mail_id)

    monkeypatch.setattr(jobs.mail, "deliver", deliver_slowly)
    worker.work(burst=True, logging_level="WARNING")
    assert calls == ids[:2]
    assert not redis_client.exists(seen(ids[1]))
    assert sorted(q.get_job_ids()) == sorted(ids[2:])  # each once
    assert redis_client.llen(q.intermediate_queue_key) == 0


def test_rq_per_job_info_lines_are_debug(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    work: Callable[[], AppWorker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    send_email("ann@example.com", "Hi", "test")
    with caplog.at_level(logging.DEBUG, logger="rq.worker"):
        AppWorker(["mail", "digests"]).work(burst=True, logging_level="DEBUG")
    per_job = [r for r in caplog.records if r.msg in leanworker.PER_JOB_MESSAGES]
    assert per_job, "RQ's per-job lines are still there, at DEBUG"
    assert {r.levelno for r in per_job} == {logging.DEBUG}
    assert any(r.levelno == logging.INFO for r in caplog.records if r.name == "rq.worker")


def test_writes_sent_as_one_script_run_all_and_raise_the_first_failure(
    redis_client: Redis,
) -> None:
    """run_as_script keeps what MULTI/EXEC did: every command runs, an error surfaces."""
    redis_client.set("a-string", "x")
    with redis_client.pipeline() as writes, redis_client.pipeline(False) as pipe:
        writes.hset("h", mapping={"f": "1", "g": 2})
        writes.hset("a-string", "f", "v")  # WRONGTYPE
        writes.zadd("z", {"m": 1.5})
        writes.expire("h", 60)
        scripts.run_as_script(pipe, writes)
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            pipe.execute()
    assert redis_client.hgetall("h") == {b"f": b"1", b"g": b"2"}
    assert redis_client.zscore("z", "m") == 1.5
    assert 0 < redis_client.ttl("h") <= 60


def test_a_job_that_fails_after_handing_over_sent_still_records_it(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a batch, `deliver` leaves its `sent` write to the worker: a job whose timeout
    fires just after (so RQ takes its failure path, not the success one) still gets it."""
    ids = [send_email(f"user{i}@example.com", "Hi", "test").id for i in range(3)]
    original = jobs.mail.deliver

    def deliver_then_time_out(mail_id: str) -> Any:
        outcome = original(mail_id)
        if mail_id == ids[1]:
            raise JobTimeoutException("just too late")
        return outcome

    monkeypatch.setattr(jobs.mail, "deliver", deliver_then_time_out)
    work()

    assert len(smtp_server.wait_for(3)) == 3
    for mail_id in ids:
        assert status.load(redis_client, mail_id).status == status.SENT  # type: ignore[union-attr]
    # RQ's failure path scheduled a retry; it will find the mail sent and skip it.
    assert ids[1] in queue(redis_client).scheduled_job_registry


def test_a_batch_writes_the_workers_state_and_heartbeat_only_when_they_change(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`busy` once a batch, the heartbeat at most once a second, and every job still runs
    with the worker key's TTL at the heartbeat TTL (90 s here), give or take a second."""
    count = leanworker.BATCH_SIZE * 3
    for i in range(count):
        send_email(f"user{i}@example.com", "Hi", "test")
    writes: list[str] = []
    ttls_ms: list[int] = []
    real_state, real_heartbeat = AppWorker.set_state, AppWorker.heartbeat
    original = jobs.mail.deliver

    def set_state(self: AppWorker, state: str, pipeline: Any = None) -> None:
        writes.append(f"state {getattr(state, 'value', state)}")
        real_state(self, state, pipeline=pipeline)

    def heartbeat(self: AppWorker, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:
            writes.append("heartbeat")
        real_heartbeat(self, timeout, pipeline=pipeline)

    def deliver(mail_id: str) -> Any:
        job = get_current_job()
        assert job is not None
        ttls_ms.append(redis_client.pttl(f"rq:worker:{job.worker_name}"))
        return original(mail_id)

    monkeypatch.setattr(AppWorker, "set_state", set_state)
    monkeypatch.setattr(AppWorker, "heartbeat", heartbeat)
    monkeypatch.setattr(jobs.mail, "deliver", deliver)
    started = time.monotonic()
    work()
    seconds = time.monotonic() - started

    assert len(smtp_server.wait_for(count)) == count
    assert writes.count("state busy") <= 3  # one a batch (a worker writes one per job)
    assert writes.count("heartbeat") <= 3 + int(seconds)
    assert len(ttls_ms) == count and min(ttls_ms) >= 88_000, ttls_ms
