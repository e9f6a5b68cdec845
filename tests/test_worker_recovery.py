"""AppWorker's maintenance with default settings, on a moved clock.

A worker "dies" here by leaving exactly the Redis state a SIGKILLed one leaves
(the fault suite kills real processes); the clock then moves through the
timeline of RQ's and our maintenance, and the recovery bound is checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from flask import Flask
from redis import Redis
from rq.job import Job, JobStatus

from app import leanworker, status
from app.mail import send_email
from app.queues import MAIL_QUEUE, get_queue
from app.worker import (
    JOB_GRACE_SECONDS,
    MAINTENANCE_LOCK_SECONDS,
    REDIS_SOCKET_TIMEOUT,
    AppWorker,
)
from tests.conftest import run_worker
from tests.servers import SMTPServer

DEFAULT_JOB_TIMEOUT = 90
DEFAULT_MAINTENANCE = 60
FIRST_RETRY_MAX = 15 * 1.2  # MAIL_RETRY_INTERVALS[0] with +20% jitter


@contextmanager
def at(moment: datetime) -> Iterator[None]:
    with time_machine.travel(moment, tick=True):
        yield


def new_worker() -> AppWorker:
    return AppWorker(["mail", "digests"])


def die_mid_send(app: Flask) -> tuple[Job, datetime]:
    """What a worker SIGKILLed while talking to the SMTP server leaves behind."""
    worker = new_worker()
    result = worker.dequeue_job_and_maintain_ttl(None)
    assert result is not None
    job, _queue = result
    started = datetime.now(UTC)
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    with app.app_context():
        redis_client = worker.connection
        outcome, _ = status.begin_attempt(
            redis_client, job.id, DEFAULT_JOB_TIMEOUT + status.LEASE_GRACE_SECONDS
        )
        assert outcome == "go"
    return job, started


def abandon(app: Flask, *, retries_left: int | None = None) -> Job:
    """A worker dies mid-send (with `retries_left` set on its job, if given), and a
    maintenance pass runs just after its started-registry entry expired."""
    job, started = die_mid_send(app)
    if retries_left is not None:
        job.retries_left = retries_left
        job.save()
    with at(started + timedelta(seconds=DEFAULT_JOB_TIMEOUT + JOB_GRACE_SECONDS + 2)):
        new_worker().clean_registries()
    return job


def test_worker_settings_keep_maintenance_on_schedule(app: Flask) -> None:
    worker = new_worker()
    assert worker.maintenance_interval == DEFAULT_MAINTENANCE
    assert worker.dequeue_timeout <= DEFAULT_MAINTENANCE // 4  # RQ: 405 s
    pool_kwargs = worker.connection.connection_pool.connection_kwargs
    assert pool_kwargs["socket_timeout"] == REDIS_SOCKET_TIMEOUT
    assert worker.max_connection_wait_time <= 5


def test_recovery_bound_for_a_worker_killed_mid_send_with_default_settings(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    mail = send_email("ann@example.com", "Hello", "test")
    job, started = die_mid_send(app_ctx)
    queue = get_queue(MAIL_QUEUE)
    registry = queue.started_job_registry
    expires = datetime.fromtimestamp(
        float(redis_client.zrange(registry.key, 0, 0, withscores=True)[0][1]), UTC
    )
    expiry = (expires - started).total_seconds()
    assert (
        DEFAULT_JOB_TIMEOUT + JOB_GRACE_SECONDS - 1
        <= expiry
        <= DEFAULT_JOB_TIMEOUT + JOB_GRACE_SECONDS + 1
    )
    # The lease outlives the registry entry: no second worker can send meanwhile.
    assert redis_client.ttl(status.lease_key(mail.id)) >= expiry - 1

    survivor = new_worker()
    with at(expires - timedelta(seconds=2)):
        survivor.clean_registries()
    assert job.id in registry.get_job_ids(cleanup=False)
    assert status.load(redis_client, mail.id).status == status.SENDING  # type: ignore[union-attr]

    noticed = expires + timedelta(seconds=1)
    with at(noticed):
        survivor.clean_registries()
    assert job.id not in registry.get_job_ids(cleanup=False)
    record = status.load(redis_client, mail.id)
    assert record is not None and record.status == status.RETRYING
    assert "worker delivering this mail was lost" in record.last_error
    retry_at = queue.scheduled_job_registry.get_scheduled_time(job.id)
    assert (retry_at - noticed).total_seconds() <= FIRST_RETRY_MAX + 1

    # Redis expires the lease on its own clock; the clock moved only in this process.
    redis_client.delete(status.lease_key(mail.id))
    with at(retry_at + timedelta(seconds=1)):
        run_worker(with_scheduler=True)
    [received] = smtp_server.wait_for(1)
    assert received.message_id == f"<{mail.id}@example.com>"
    assert status.load(redis_client, mail.id).status == status.SENT  # type: ignore[union-attr]

    # The bound (README, "Reliability"): the entry expires, the next pass (at most one
    # maintenance interval plus one dequeue wait later) retries it, the first retry
    # interval passes, the scheduler (1 s) and a pop (1 s) follow.
    bound = (
        DEFAULT_JOB_TIMEOUT
        + JOB_GRACE_SECONDS
        + DEFAULT_MAINTENANCE
        + survivor.dequeue_timeout
        + FIRST_RETRY_MAX
        + 2
    )
    assert bound <= 5 * 60
    assert (retry_at - started).total_seconds() <= bound


def test_abandoned_job_without_retries_left_is_recorded_failed(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    mail = send_email("ann@example.com", "Hello", "test")
    job = abandon(app_ctx, retries_left=0)
    record = status.load(redis_client, mail.id)
    assert record is not None and record.status == status.FAILED
    assert "no retries left" in record.last_error
    assert job.id in get_queue(MAIL_QUEUE).failed_job_registry
    assert redis_client.zscore(status.FAILED_INDEX, mail.id) is not None


def test_a_job_popped_by_a_dead_worker_is_put_back_unchanged(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    mail = send_email("ann@example.com", "Hello", "test")
    queue = get_queue(MAIL_QUEUE)
    # A worker popped it (LMOVE into the intermediate list), then died.
    assert redis_client.lmove(queue.key, queue.intermediate_queue_key) == mail.id.encode()
    survivor = new_worker()
    survivor.clean_registries()  # first sighting: a live worker could be about to start it
    assert redis_client.lrange(queue.intermediate_queue_key, 0, -1) == [mail.id.encode()]
    # A live worker may hold a mail job claimed in a batch behind one slow job.
    grace = app_ctx.config["MAIL_JOB_TIMEOUT"] + int(leanworker.BATCH_SECONDS) + 10
    assert grace > DEFAULT_MAINTENANCE
    with at(datetime.now(UTC) + timedelta(seconds=grace - 5)):
        survivor.clean_registries()
    assert redis_client.llen(queue.intermediate_queue_key) == 1
    with at(datetime.now(UTC) + timedelta(seconds=grace + 1)):
        survivor.clean_registries()
    assert redis_client.llen(queue.intermediate_queue_key) == 0
    assert redis_client.lrange(queue.key, 0, -1) == [mail.id.encode()]
    assert not redis_client.exists(queue.intermediate_queue.get_first_seen_key(mail.id))
    stored = Job.fetch(mail.id, connection=redis_client, serializer=queue.serializer)
    assert stored.retries_left == len(app_ctx.config["MAIL_RETRY_INTERVALS"])  # none spent
    run_worker()
    assert [m.message_id for m in smtp_server.wait_for(1)] == [f"<{mail.id}@example.com>"]


def test_a_job_whose_data_is_gone_is_dropped_from_the_intermediate_list(
    app_ctx: Flask, redis_client: Redis
) -> None:
    queue = get_queue(MAIL_QUEUE)
    redis_client.rpush(queue.intermediate_queue_key, "deadbeef")
    new_worker().clean_registries()
    assert redis_client.llen(queue.intermediate_queue_key) == 0


def test_start_is_registered_and_the_pop_copy_dropped_in_one_step(
    app_ctx: Flask, redis_client: Redis
) -> None:
    mail = send_email("ann@example.com", "Hello", "test")
    worker = new_worker()
    result = worker.dequeue_job_and_maintain_ttl(None)
    assert result is not None
    queue = get_queue(MAIL_QUEUE)
    assert redis_client.lrange(queue.intermediate_queue_key, 0, -1) == [mail.id.encode()]
    worker.prepare_execution(result[0])
    assert redis_client.llen(queue.intermediate_queue_key) == 0
    assert mail.id in queue.started_job_registry.get_job_ids(cleanup=False)


def test_failed_jobs_rq_handled_alone_are_reconciled(app_ctx: Flask, redis_client: Redis) -> None:
    """E.g. retries spent on Redis errors: RQ failed the job, our code never ran to the end."""
    stuck = send_email("ann@example.com", "Hello", "test")
    sent = send_email("bob@example.com", "Hello", "test")
    queue = get_queue(MAIL_QUEUE)
    for job_id in (stuck.id, sent.id):
        job = Job.fetch(job_id, connection=redis_client, serializer=queue.serializer)
        queue.remove(job)
        with redis_client.pipeline() as pipe:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job._handle_failure("Traceback...\nConnectionError: Redis went away", pipe)
            pipe.execute()
    redis_client.hset(status.key(sent.id), "status", status.SENT)
    new_worker().clean_registries()
    stuck_record = status.load(redis_client, stuck.id)
    assert stuck_record is not None and stuck_record.status == status.FAILED
    assert stuck_record.last_error == "RQ gave up on the job: ConnectionError: Redis went away"
    assert status.load(redis_client, sent.id).status == status.SENT  # type: ignore[union-attr]
    # Incremental: a second pass has nothing new to look at.
    mark = float(redis_client.get("mq:reconciled:mail") or 0)
    assert mark > datetime.now(UTC).timestamp()


def test_maintenance_lock_is_short_and_always_released(
    app_ctx: Flask, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = get_queue(MAIL_QUEUE)
    worker = new_worker()
    [app_queue] = [q for q in worker.queues if q.name == MAIL_QUEUE]
    assert app_queue.acquire_maintenance_lock()
    assert 0 < redis_client.ttl(queue.registry_cleaning_key) <= MAINTENANCE_LOCK_SECONDS
    app_queue.release_maintenance_lock()

    def boom(_queue: object) -> None:
        raise RuntimeError("bug in a cleanup step")

    monkeypatch.setattr(worker, "requeue_stranded", boom)
    with pytest.raises(RuntimeError):
        worker.clean_registries()
    assert not redis_client.exists(queue.registry_cleaning_key)


# --- what maintenance records is visible: mailqueue.events and /metrics counters -----------


def _events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailqueue.events"]


def test_an_abandoned_delivery_is_logged_and_counted(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mailqueue.events")
    retried = send_email("ann@example.com", "Hello", "test")
    job = abandon(app_ctx)
    [line] = [e for e in _events(caplog) if "retry_scheduled" in e]
    assert f"mail_id={retried.id} job_id={job.id} template=test attempt=1" in line
    assert "error=AbandonedJobError" in line and "retries_left=8" in line
    assert redis_client.hgetall(status.STATS_KEY) == {b"retried:test": b"1"}


def test_an_abandoned_delivery_without_retries_is_logged_failed_and_counted(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mailqueue.events")
    mail = send_email("ann@example.com", "Hello", "test")
    abandon(app_ctx, retries_left=0)
    [line] = [e for e in _events(caplog) if e.startswith("event=failed")]
    assert f"mail_id={mail.id}" in line and "attempt=1" in line and "lost" in line
    assert redis_client.hgetall(status.STATS_KEY) == {b"failed:test": b"1"}
    # Settling again (a second maintenance pass) changes and counts nothing.
    assert status.settle(redis_client, mail.id, status.FAILED, "again", 60) is None
    assert redis_client.hgetall(status.STATS_KEY) == {b"failed:test": b"1"}


def test_a_reconciled_failure_is_logged_and_counted(
    app_ctx: Flask, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mailqueue.events")
    stuck = send_email("ann@example.com", "Hello", "test")
    queue = get_queue(MAIL_QUEUE)
    job = Job.fetch(stuck.id, connection=redis_client, serializer=queue.serializer)
    queue.remove(job)
    with redis_client.pipeline() as pipe:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        job._handle_failure("Traceback...\nConnectionError: Redis went away", pipe)
        pipe.execute()
    new_worker().clean_registries()
    [line] = [e for e in _events(caplog) if e.startswith("event=failed")]
    assert f"mail_id={stuck.id}" in line and "attempt=0" in line
    assert 'reason="RQ gave up on the job: ConnectionError: Redis went away"' in line
    assert redis_client.hgetall(status.STATS_KEY) == {b"failed:test": b"1"}
