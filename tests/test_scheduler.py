"""scheduler.py: idempotent registration with rq-scheduler, JSON jobs the worker can run,
the crontab warning filtered narrowly, and the Procfile line restarted."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
import zlib
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from redis import Redis
from rq.job import Job
from rq_scheduler import Scheduler
from rq_scheduler.utils import get_next_scheduled_time

import scheduler as scheduler_module
from app import digests
from app.queues import DIGEST_QUEUE, JSONJob, get_queue
from tests.helpers import PROJECT_ROOT, procfile, subprocess_env
from tests.servers import SMTPServer, wait_until

DISPATCH_ID = "mailqueue-digest-dispatch"
SCHEDULED = Scheduler.scheduled_jobs_key


def registrations(redis: Redis) -> dict[str, float]:
    return {k.decode(): v for k, v in redis.zrange(SCHEDULED, 0, -1, withscores=True)}


def run_scheduler_burst(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scheduler.py", "--burst", *args],
        cwd=PROJECT_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_registration_run_three_times_leaves_one_identical_registration(
    env: dict[str, str], redis_client: Redis
) -> None:
    definitions = []
    for run in range(3):
        started = time.time()
        result = run_scheduler_burst()
        assert "Traceback" not in result.stderr
        assert "FutureWarning" not in result.stderr
        action = "registered" if run == 0 else "kept"
        assert f"periodic job {DISPATCH_ID}: {action}" in result.stderr, result.stderr
        seen = registrations(redis_client)
        assert list(seen) == [DISPATCH_ID]
        # The next fire time: a five-minute boundary in UTC, at most five minutes after
        # the run (a run that straddles a boundary fires the dispatch and moves it on).
        fire = seen[DISPATCH_ID]
        assert fire % 300 == 0 and started < fire <= time.time() + 300
        definitions.append(
            JSONJob.fetch(DISPATCH_ID, connection=redis_client).meta[scheduler_module.FINGERPRINT]
        )
    assert definitions[0] == definitions[1] == definitions[2]
    job = JSONJob.fetch(DISPATCH_ID, connection=redis_client)
    assert job.func_name == digests.DISPATCH_JOB and job.origin == "digests"
    assert job.meta["cron_string"] == "*/5 * * * *"
    # Stored as (compressed) JSON: readable without unpickling anything.
    raw = redis_client.hget(Job.key_for(DISPATCH_ID), "data")
    assert json.loads(zlib.decompress(raw or b""))[0] == digests.DISPATCH_JOB


def test_stale_registrations_of_ours_are_removed_and_others_kept(
    env: dict[str, str], redis_client: Redis
) -> None:
    legacy = Scheduler(queue_name="digests", connection=redis_client)  # pickle, as 0.14 does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        legacy.cron("*/15 * * * *", func="jobs.digest.dispatch", queue_name="digests")
        legacy.cron("0 * * * *", func="jobs.digest.dispatch", id="mailqueue-old-dispatch")
        legacy.cron("0 * * * *", func="someone.else.task", id="foreign", queue_name="other")
    assert len(registrations(redis_client)) == 3
    run_scheduler_burst()
    assert set(registrations(redis_client)) == {DISPATCH_ID, "foreign"}
    assert redis_client.exists(Job.key_for("mailqueue-old-dispatch")) == 0


def every_ten_minutes(description: str) -> tuple[scheduler_module.Periodic, ...]:
    """The dispatch as a differing definition (another version's, or a changed one)."""
    return (
        scheduler_module.Periodic(
            id=DISPATCH_ID,
            cron="*/10 * * * *",
            func=digests.DISPATCH_JOB,
            queue="digests",
            timeout=240,
            description=description,
        ),
    )


def test_a_changed_definition_is_registered_again(app_ctx: Flask, redis_client: Redis) -> None:
    sched = scheduler_module.make_scheduler(redis_client)
    assert scheduler_module.register(sched) == {DISPATCH_ID: "registered"}
    assert scheduler_module.register(sched) == {DISPATCH_ID: "kept"}
    changed = every_ten_minutes("every ten minutes")
    assert scheduler_module.register(sched, changed) == {DISPATCH_ID: "registered"}
    assert JSONJob.fetch(DISPATCH_ID, connection=redis_client).meta["cron_string"] == (
        "*/10 * * * *"
    )
    assert list(registrations(redis_client)) == [DISPATCH_ID]


def test_a_cycle_registers_what_is_missing_and_leaves_another_versions_registration(
    app_ctx: Flask, redis_client: Redis
) -> None:
    """During a deploy overlap the other version's definition stays until that version
    stops (replacing it every cycle would push the dispatch past every tick); one that
    is gone (Redis restarted empty, flushed) comes back on the next cycle."""
    sched = scheduler_module.make_scheduler(redis_client)
    scheduler_module.register(sched, every_ten_minutes("another version's dispatch"))
    before = registrations(redis_client)
    sched.enqueue_jobs()
    assert registrations(redis_client) == before
    assert JSONJob.fetch(DISPATCH_ID, connection=redis_client).description == (
        "another version's dispatch"
    )
    redis_client.zrem(SCHEDULED, DISPATCH_ID)
    sched.enqueue_jobs()
    assert list(registrations(redis_client)) == [DISPATCH_ID]
    assert scheduler_module.register(sched) == {DISPATCH_ID: "kept"}  # this version's


def test_the_scheduled_dispatch_runs_on_the_json_worker_and_sends_digests(
    app_ctx: Flask, redis_client: Redis, work: Any, smtp_server: SMTPServer
) -> None:
    digests.upsert_subscriber("ann@example.com", "UTC", "daily", 0)
    digests.add_item("ann@example.com", "Hello")
    sched = scheduler_module.make_scheduler(redis_client)
    scheduler_module.register(sched)
    redis_client.zadd(SCHEDULED, {DISPATCH_ID: 0})  # due now
    sched.enqueue_jobs()
    assert get_queue(DIGEST_QUEUE).job_ids == [DISPATCH_ID]
    # rq-scheduler put it back for the next five-minute mark.
    assert registrations(redis_client)[DISPATCH_ID] > datetime.now(UTC).timestamp()
    work()
    [received] = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["ann@example.com"]
    job = JSONJob.fetch(DISPATCH_ID, connection=redis_client)
    assert job.get_status() == "finished"
    assert job.return_value() == {"due": 1, "enqueued": 1, "skipped": 0, "jobs": 1}


def test_only_the_crontab_warning_is_filtered() -> None:
    # pytest runs with filterwarnings=error: this raises unless pyproject's filter matches.
    get_next_scheduled_time("*/5 * * * *")
    with pytest.raises(FutureWarning):
        warnings.warn("some other future change", FutureWarning, stacklevel=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler_module.quiet_crontab()
        get_next_scheduled_time("*/5 * * * *")  # the in-process filter matches too
        with pytest.raises(FutureWarning):
            warnings.warn("some other future change", FutureWarning, stacklevel=1)


def test_the_procfile_scheduler_line_restarted_keeps_one_registration(
    env: dict[str, str], redis_client: Redis
) -> None:
    command = procfile()["scheduler"]
    assert command.startswith("TZ=UTC ")
    snapshots = []
    for _ in range(3):
        before = set(redis_client.keys("rq:scheduler_instance:*"))
        process = subprocess.Popen(
            ["sh", "-c", command],  # as honcho/foreman run a Procfile line
            cwd=PROJECT_ROOT,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, signalled as a whole
        )
        try:
            assert wait_until(
                lambda before=before: set(redis_client.keys("rq:scheduler_instance:*")) - before,
                timeout=30,
            ), "the scheduler did not start"
            snapshots.append(registrations(redis_client))
        finally:
            # What a process manager does on restart: SIGTERM to the process group.
            os.killpg(process.pid, signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        assert "Traceback" not in stderr, stderr
        assert "FutureWarning" not in stderr
    assert snapshots[0] == snapshots[1] == snapshots[2]
    assert list(snapshots[0]) == [DISPATCH_ID]
    assert shlex.split(command)[-1] == "scheduler.py"


def test_two_schedulers_at_once_send_each_digest_once(
    env: dict[str, str], redis_client: Redis, smtp_server: SMTPServer, app: Flask
) -> None:
    with app.app_context():
        for n in range(5):
            digests.upsert_subscriber(f"user{n}@example.com", "UTC", "daily", 0)
            digests.add_item(f"user{n}@example.com", "Hello")
        scheduler_module.register(scheduler_module.make_scheduler(redis_client))
    redis_client.zadd(SCHEDULED, {DISPATCH_ID: 0})  # due now, for both
    processes = [
        subprocess.Popen(
            [sys.executable, "scheduler.py", "--burst", "--interval", "1"],
            cwd=PROJECT_ROOT,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
    assert list(registrations(redis_client)) == [DISPATCH_ID]
    from tests.conftest import run_worker

    run_worker()
    received = smtp_server.wait_for(5)
    assert sorted(r.rcpt_tos[0] for r in received) == [f"user{n}@example.com" for n in range(5)]


def test_a_bad_setting_stops_the_scheduler_with_one_line(env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "scheduler.py", "--burst"],
        cwd=PROJECT_ROOT,
        env={**subprocess_env(), "MAIL_PORT": "abc"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("mailqueue scheduler not started: MAIL_PORT: ")
    ), result.stderr
    assert "Traceback" not in result.stderr
