"""Workers killed (SIGKILL) and stopped (SIGTERM) mid-burst: real `rq worker` processes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from app import status
from app.queues import MAIL_QUEUE
from tests.faults.harness import Report, Row, deployment
from tests.servers import wait_until

pytestmark = pytest.mark.fault


def test_worker_sigkilled_mid_job_and_after_a_pop(
    tmp_path: Path, report: Report, mode: str
) -> None:
    with deployment(tmp_path, mode) as world:
        world.smtp.handler.hang_seconds = 0.2  # keep jobs in flight most of the time
        survivor = world.start_worker()  # holds the scheduler lock
        victim = world.start_worker()
        # Each worker has up to MAIL_CONCURRENCY (16, or 8) jobs in flight: enough mails
        # that the queue still holds some for the test's own pop below.
        ids = world.send(120)
        assert wait_until(
            lambda: len(world.smtp.messages) >= 4 and len(world.in_flight(victim)) >= 2,
            timeout=30,
        ), victim.tail()
        victim.signal_group(signal.SIGKILL)
        killed = time.monotonic()
        victim.process.wait(timeout=10)
        # Every job the victim had started is still in the started registry, under its
        # name, until maintenance finds it abandoned (its timeout + grace from now).
        in_flight = world.in_flight(victim)
        # The kill can land after an SMTP acceptance was recorded but before the worker
        # let go of the job id: such a mail is done and there is nothing to recover.
        before = {i: status.load(world.redis, i) for i in in_flight}
        unfinished = {i for i, r in before.items() if r is None or r.status != status.SENT}
        # The state a worker killed right after its pop leaves: the job only in the
        # queue's intermediate list (the pop is one LMOVE; no process can stop halfway).
        queue_key, intermediate = f"rq:queue:{MAIL_QUEUE}", f"rq:queue:{MAIL_QUEUE}:intermediate"
        popped = world.redis.lmove(queue_key, intermediate)
        assert in_flight and popped is not None, "the burst ended too early"
        stranded = popped.decode()
        world.start_worker()  # another worker comes up

        world.wait_delivered([stranded], timeout=60)
        stranded_back = time.monotonic() - killed
        world.wait_delivered(sorted(in_flight), timeout=120)
        in_flight_back = time.monotonic() - killed
        world.wait_delivered(ids, timeout=60)
        world.settle_quietly(1)
        # A duplicate only of a mail in flight at the kill (accepted, not yet recorded).
        lost, duplicated = world.tally(ids, may_repeat=in_flight)
        assert lost == 0
        assert survivor.alive()
        records = {i: status.load(world.redis, i) for i in ids}
        assert all(r is not None and r.status == status.SENT for r in records.values())
        for mail_id in unfinished:
            victim_record = records[mail_id]
            assert victim_record is not None
            assert "lost" in victim_record.last_error
            assert victim_record.attempts >= 2
        report.add(
            Row(
                f"worker SIGKILLed ({mode})",
                f"120 mails, 2 workers (+1 started after); {len(in_flight)} in flight",
                "SIGKILL of a worker and its scheduler with jobs STARTED; "
                "a popped-never-started job left in the intermediate list",
                lost,
                duplicated,
                f"popped job {stranded_back:.0f} s, started job {in_flight_back:.0f} s "
                "after the kill",
                "started: MAIL_JOB_TIMEOUT 5 + 30 s grace + maintenance 5 s + retry ~1 s; "
                "popped: two maintenance passes >= 17 s apart "
                "(MAIL_JOB_TIMEOUT 5 + batch 2 + 10 s)",
            )
        )
        assert stranded in ids


def test_worker_sigterm_finishes_its_jobs(tmp_path: Path, report: Report, mode: str) -> None:
    with deployment(tmp_path, mode) as world:
        world.smtp.handler.hang_seconds = 0.5  # below MAIL_TIMEOUT (1 s)
        worker = world.start_worker()
        ids = world.send(40)  # more than the worker keeps in flight
        assert wait_until(lambda: len(world.in_flight(worker)) >= 2, timeout=20)
        in_flight = world.in_flight(worker)
        stopped = time.monotonic()
        worker.signal_group(signal.SIGTERM)  # a Procfile host's restart
        assert worker.process.wait(timeout=20) == 0, worker.tail()
        took = time.monotonic() - stopped
        received = world.received()
        # Every job in flight finished, none dropped; nothing new was started.
        assert all(received[world.message_id(i)] == 1 for i in in_flight)
        left = [i for i in ids if world.status_of(i) == status.QUEUED]
        assert left, "the worker took every mail before the SIGTERM"
        assert len(left) == len(ids) - len(world.smtp.messages)
        world.smtp.handler.hang_seconds = 0
        world.start_worker()
        world.wait_delivered(ids, timeout=30)
        world.settle_quietly(0.5)
        lost, duplicated = world.tally(ids)
        assert (lost, duplicated) == (0, 0)

        idle = world.workers[-1]
        assert wait_until(lambda: world.current_job(idle) is None, timeout=10)
        started = time.monotonic()
        idle.signal_group(signal.SIGTERM)
        assert idle.process.wait(timeout=10) == 0
        idle_exit = time.monotonic() - started
        report.add(
            Row(
                f"worker SIGTERMed ({mode})",
                f"40 mails, 1 worker (+1 started after); {len(in_flight)} in flight",
                "SIGTERM while jobs were in DATA (0.5 s server delay), then SIGTERM when idle",
                lost,
                duplicated,
                f"busy worker exited {took:.1f} s after SIGTERM, idle {idle_exit:.1f} s",
                "warm shutdown: the jobs in flight finished, the rest stayed queued",
            )
        )
