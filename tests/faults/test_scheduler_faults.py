"""The Procfile's scheduler line across Redis outages: it outlives them, registers the
periodic dispatch again when Redis comes back empty, and still stops on SIGTERM while
Redis is down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq_scheduler import Scheduler

from app import PROJECT_ROOT
from app.queues import DIGEST_QUEUE, get_queue
from tests.faults.harness import Deployment, Report, Row, deployment, procfile_command
from tests.servers import wait_until

pytestmark = pytest.mark.fault

DISPATCH_ID = "mailqueue-digest-dispatch"
SCHEDULED = Scheduler.scheduled_jobs_key


def start_scheduler(world: Deployment, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAIL_", "REDIS"))}
    env.update(world.env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with log.open("wb") as out:
        return subprocess.Popen(
            ["bash", "-c", procfile_command("scheduler") + " --interval 1"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def registrations(world: Deployment) -> list[str]:
    found = world.redis_call(lambda r: r.zrange(SCHEDULED, 0, -1))
    return [k.decode() for k in found or ()]


def test_scheduler_outlives_redis_restarts_and_stops_while_it_is_down(
    tmp_path: Path, report: Report
) -> None:
    log = tmp_path / "scheduler.log"
    outages = lambda: log.read_text(errors="replace").count("Redis unreachable")  # noqa: E731
    with deployment(tmp_path) as world:
        process = start_scheduler(world, log)
        try:
            assert wait_until(lambda: registrations(world) == [DISPATCH_ID], timeout=30)

            # Redis dies, then comes back empty (a Redis that keeps nothing on disk).
            world.redis_server.stop(kill=True)
            down = time.monotonic()
            assert wait_until(lambda: outages() >= 1, timeout=30), log.read_text()
            assert process.poll() is None, log.read_text()
            world.redis_server.start()
            world.redis.flushall()
            back = time.monotonic()
            assert wait_until(lambda: registrations(world) == [DISPATCH_ID], timeout=60), (
                log.read_text()
            )
            recovered = time.monotonic() - back
            # The loop runs again: a due dispatch is moved onto the digest queue.
            world.redis.zadd(SCHEDULED, {DISPATCH_ID: 0})
            with world.app.app_context():
                queue = get_queue(DIGEST_QUEUE)
                assert wait_until(lambda: queue.count == 1, timeout=30), log.read_text()
            # rq-scheduler enqueues the job, then ZREMs and re-ZADDs its next run: under
            # load a read can fall between the two, so wait for the re-registration.
            assert wait_until(lambda: registrations(world) == [DISPATCH_ID], timeout=10), (
                registrations(world)
            )

            # Data lost with no error seen (flushed, or restarted between two cycles):
            # the next cycle registers the dispatch again.
            world.redis.flushall()
            assert wait_until(lambda: registrations(world) == [DISPATCH_ID], timeout=30)
            assert "registered again" in log.read_text(), log.read_text()

            # A restart of the host while Redis is down: SIGTERM still stops it.
            world.redis_server.stop(kill=True)
            assert wait_until(lambda: outages() >= 2, timeout=30), log.read_text()
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            world.redis_server.start()  # for the deployment's own clean-up
        text = log.read_text(errors="replace")
        assert process.returncode == 0, text
        assert "Traceback" not in text, text
        report.add(
            Row(
                "scheduler across Redis restarts",
                "the Procfile's scheduler line (1 s cycle)",
                f"redis-server SIGKILLed, down {back - down:.1f} s, back empty; "
                "flushed while up; SIGTERM while Redis is down",
                0,
                0,
                f"dispatch registered again {recovered:.1f} s after Redis was back",
                "one registration throughout; exit 0 on SIGTERM with Redis down",
            )
        )
