"""Digests over a simulated day with two schedulers at once, restarted again and again
(once with SIGKILL), and two workers: every digest period exactly once at the SMTP server.

Real processes: the Procfile's scheduler line (twice at once, with `--interval 1` so a
cycle takes a second instead of 30) and worker line (twice). The day is simulated: at
each hourly step the test points the registered dispatch job at that instant (its `at`
argument) and makes it due, so the running schedulers enqueue it; it also enqueues the
same dispatch once more itself, as a second scheduler firing the same tick would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from rq_scheduler import Scheduler

from app import PROJECT_ROOT, digests
from app.queues import DIGEST_QUEUE, MAIL_QUEUE, JSONJob, get_queue
from tests.faults.harness import Deployment, Report, Row, deployment, procfile_command
from tests.servers import wait_until

pytestmark = pytest.mark.fault

DISPATCH_ID = "mailqueue-digest-dispatch"
DAY = datetime(2031, 6, 17, tzinfo=UTC)  # no DST change anywhere below
SUBSCRIBERS = [
    ("utc@example.com", "UTC", "daily", 8, "monday"),
    ("paris@example.com", "Europe/Paris", "daily", 7, "monday"),
    ("ny@example.com", "America/New_York", "daily", 18, "monday"),
    ("la@example.com", "America/Los_Angeles", "daily", 23, "monday"),
    ("kolkata@example.com", "Asia/Kolkata", "daily", 9, "monday"),
    ("auckland@example.com", "Pacific/Auckland", "daily", 8, "monday"),
    ("tokyo@example.com", "Asia/Tokyo", "daily", 0, "monday"),
    ("weekly@example.com", "Europe/Berlin", "weekly", 10, "tuesday"),
]
RESTART_EVERY = 6  # simulated hours


class Schedulers:
    """Two copies of the Procfile's scheduler line, restarted on demand."""

    def __init__(self, world: Deployment) -> None:
        self.world = world
        self.processes: list[subprocess.Popen[bytes]] = []
        self.restarts = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAIL_", "REDIS"))}
        env.update(self.world.env)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        command = procfile_command("scheduler") + " --interval 1"
        for n in range(2):
            with (self.world.workdir / f"scheduler-{self.restarts}-{n}.log").open("wb") as log:
                self.processes.append(
                    subprocess.Popen(
                        ["bash", "-c", command],
                        cwd=PROJECT_ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def stop(self, signum: int = signal.SIGTERM) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
        for process in self.processes:
            process.wait(timeout=30)
        self.processes = []
        self.restarts += 1


def registrations(world: Deployment) -> list[str]:
    return [k.decode() for k in world.redis.zrange(Scheduler.scheduled_jobs_key, 0, -1)]


def fire(world: Deployment, at: datetime) -> None:
    """The cron tick at `at`: the schedulers enqueue the dispatch, and a duplicate fires."""
    job = JSONJob.fetch(DISPATCH_ID, connection=world.redis)
    assert job.func_name == "jobs.digest.dispatch"  # (also loads the data before the change)
    job.args = (at.isoformat(),)
    job.save()
    world.redis.zadd(Scheduler.scheduled_jobs_key, {DISPATCH_ID: 0})
    assert wait_until(
        lambda: (world.redis.zscore(Scheduler.scheduled_jobs_key, DISPATCH_ID) or 0) > 0,
        timeout=30,
    ), "no scheduler picked the dispatch up"
    with world.app.app_context():
        get_queue(DIGEST_QUEUE).enqueue("jobs.digest.dispatch", at.isoformat(), result_ttl=0)


def drained(world: Deployment) -> bool:
    with world.app.app_context():
        for name in (DIGEST_QUEUE, MAIL_QUEUE):
            queue = get_queue(name)
            if queue.count or queue.started_job_registry.get_job_count(cleanup=False):
                return False
            if queue.scheduled_job_registry.get_job_count(cleanup=False):
                return False
    return True


def test_digests_over_a_simulated_day_with_two_schedulers_restarted(
    tmp_path: Path, report: Report
) -> None:
    with deployment(tmp_path) as world:
        expected: dict[str, list[str]] = {}
        end = DAY + timedelta(days=1, minutes=2)
        with world.app.app_context():
            for email, zone, frequency, hour, weekday in SUBSCRIBERS:
                digests.upsert_subscriber(email, zone, frequency, hour, weekday, now=DAY)
                schedule = digests.Schedule(zone, frequency, hour, weekday)
                periods: list[str] = []
                while True:
                    period, due = schedule.next_send(DAY, *periods[-1:])
                    if due > end:
                        break
                    periods.append(period)
                expected[email] = periods
        assert sum(len(p) for p in expected.values()) >= len(SUBSCRIBERS)

        for _ in range(2):
            world.start_worker()
        schedulers = Schedulers(world)
        schedulers.start()
        assert wait_until(lambda: registrations(world) == [DISPATCH_ID], timeout=30)

        started = time.monotonic()
        kills = 0
        steps = 0
        for hour in range(25):
            moment = DAY + timedelta(hours=hour, minutes=2)
            with world.app.app_context(), time_machine.travel(moment - timedelta(minutes=1)):
                for email, *_ in SUBSCRIBERS:
                    digests.add_item(email, f"news at {moment:%H:%M}")
            if hour and hour % RESTART_EVERY == 0:
                hard = hour == RESTART_EVERY * 2
                schedulers.stop(signal.SIGKILL if hard else signal.SIGTERM)
                kills += 1
                schedulers.start()
            fire(world, moment)
            steps += 1
            assert wait_until(lambda: drained(world), timeout=60, interval=0.1)
            assert registrations(world) == [DISPATCH_ID]
        schedulers.stop()
        took = time.monotonic() - started
        world.settle_quietly(1)

        by_rcpt: Counter[str] = Counter()
        for message in world.smtp.messages:
            by_rcpt.update(message.rcpt_tos)
        ids = Counter(m.message_id for m in world.smtp.messages)
        duplicated = sum(n - 1 for n in ids.values())
        assert duplicated == 0
        lost = 0
        with world.app.app_context():
            for email, periods in expected.items():
                lost += max(0, len(periods) - by_rcpt[email])
                assert by_rcpt[email] == len(periods), (email, periods, by_rcpt[email])
                subscriber = digests.get_subscriber(email)
                assert subscriber is not None and subscriber.last_period == periods[-1]
        total = sum(len(p) for p in expected.values())
        report.add(
            Row(
                "digests: 2 schedulers, restarts",
                f"{len(SUBSCRIBERS)} subscribers in 8 zones, {total} periods over a simulated "
                f"day ({steps} hourly ticks), 2 workers",
                f"2 schedulers at once; both restarted {kills} times (once SIGKILL); "
                "every tick fired twice",
                lost,
                duplicated,
                f"n/a ({took:.0f} s for the day)",
                "every period exactly once; one registration throughout",
            )
        )
