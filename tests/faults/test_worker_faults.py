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


def test_worker_sigkilled_mid_job_and_after_a_pop(tmp_path: Path, report: Report) -> None:
    with deployment(tmp_path) as world:
        world.smtp.handler.hang_seconds = 0.2  # keep a job in flight most of the time
        survivor = world.start_worker()  # holds the scheduler lock
        victim = world.start_worker()
        # Each worker claims up to leanworker.BATCH_SIZE (16) jobs per pop: enough mails
        # that the queue still holds some for the test's own pop below.
        ids = world.send(60)
        assert wait_until(
            lambda: len(world.smtp.messages) >= 4 and world.current_job(victim) is not None,
            timeout=30,
        ), victim.tail()
        in_flight = world.current_job(victim)
        victim.signal_group(signal.SIGKILL)
        killed = time.monotonic()
        victim.process.wait(timeout=10)
        # The kill can land after the SMTP acceptance was recorded but before the worker
        # let go of the job id: then nothing was in flight and there is nothing to recover.
        killed_record = status.load(world.redis, in_flight)
        finished_before_kill = killed_record is not None and killed_record.status == status.SENT
        # The state a worker killed right after its pop leaves: the job only in the
        # queue's intermediate list (the pop is one LMOVE; no process can stop halfway).
        queue_key, intermediate = f"rq:queue:{MAIL_QUEUE}", f"rq:queue:{MAIL_QUEUE}:intermediate"
        popped = world.redis.lmove(queue_key, intermediate)
        assert in_flight is not None and popped is not None, "the burst ended too early"
        stranded = popped.decode()
        world.start_worker()  # another worker comes up

        world.wait_delivered([stranded], timeout=60)
        stranded_back = time.monotonic() - killed
        world.wait_delivered([in_flight], timeout=120)
        in_flight_back = time.monotonic() - killed
        world.wait_delivered(ids, timeout=60)
        world.settle_quietly(1)
        lost, duplicated = world.tally(ids)
        assert lost == 0
        assert duplicated <= 1
        if duplicated:
            assert world.received()[world.message_id(in_flight)] == 2
        assert survivor.alive()
        records = {i: status.load(world.redis, i) for i in ids}
        assert all(r is not None and r.status == status.SENT for r in records.values())
        victim_record = records[in_flight]
        assert victim_record is not None
        if not finished_before_kill:
            assert "lost" in victim_record.last_error
            assert victim_record.attempts >= 2
        report.add(
            Row(
                "worker SIGKILLed",
                "60 mails, 2 workers (+1 started after)",
                "SIGKILL of a worker and its scheduler while a job was STARTED; "
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


def test_worker_sigterm_finishes_its_job(tmp_path: Path, report: Report) -> None:
    with deployment(tmp_path) as world:
        world.smtp.handler.hang_seconds = 0.5  # below MAIL_TIMEOUT (1 s)
        worker = world.start_worker()
        ids = world.send(5)
        assert wait_until(lambda: world.current_job(worker) is not None, timeout=20)
        in_flight = world.current_job(worker)
        assert in_flight is not None
        stopped = time.monotonic()
        worker.signal_group(signal.SIGTERM)  # a Procfile host's restart
        assert worker.process.wait(timeout=20) == 0, worker.tail()
        took = time.monotonic() - stopped
        assert world.received()[world.message_id(in_flight)] == 1  # finished, not dropped
        left = [i for i in ids if world.status_of(i) == status.QUEUED]
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
                "worker SIGTERMed",
                "5 mails, 1 worker (+1 started after)",
                "SIGTERM while a job was in DATA (0.5 s server delay), then SIGTERM when idle",
                lost,
                duplicated,
                f"busy worker exited {took:.1f} s after SIGTERM, idle {idle_exit:.1f} s",
                "warm shutdown: the job in flight finished, the rest stayed queued",
            )
        )
