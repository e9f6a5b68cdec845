"""Redis Sentinel failover with real processes: a master (AOF), one replica and three
sentinels on loopback; the Procfile's worker (with its scheduler child) and scheduler
lines; the web app in-process. Accepted mail is never lost, and without a replica
nothing is accepted."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine

from app import digests, status
from app.errors import QueueUnavailableError
from app.mail import send_email
from tests.faults.harness import Deployment, Report, Row
from tests.faults.test_digest_faults import DISPATCH_ID, fire, registrations
from tests.faults.test_scheduler_faults import start_scheduler
from tests.sentinels import SentinelCluster
from tests.servers import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.slow]

BURST = 60
KILL_AT = 20  # the master is SIGKILLed after this many mails were accepted
RESUME_LIMIT = 15.0  # seconds from the promotion to the next delivery
DAY = datetime(2031, 6, 17, tzinfo=UTC)
DIGEST_SUBSCRIBERS = ("d1@example.com", "d2@example.com", "d3@example.com")


class SentinelDeployment(Deployment):
    """A Deployment whose Redis is a SentinelCluster, reached through its sentinels."""

    cluster: SentinelCluster

    def start_redis(self) -> dict[str, str]:
        self.cluster = SentinelCluster().start()
        self.redis_server = self.cluster.master
        return {"REDIS_URL": self.cluster.url, "REDIS_SENTINELS": self.cluster.setting}

    def stop(self) -> None:
        super().stop()
        self.cluster.cleanup()

    def try_send(self, address: str) -> str | None:
        """send_email's mail id, or None when it refused (QueueUnavailableError)."""
        with self.app.app_context():
            try:
                return send_email(address, "Burst", "test").id
            except QueueUnavailableError:
                return None


def delivered_at(world: Deployment) -> list[float]:
    return [m.received_at for m in world.smtp.messages]


def test_master_killed_mid_burst_fails_over_without_losing_accepted_mail(
    tmp_path: Path, report: Report
) -> None:
    world = SentinelDeployment(tmp_path, {})
    scheduler = None
    try:
        with world.app.app_context():
            for email in DIGEST_SUBSCRIBERS:
                digests.upsert_subscriber(email, "UTC", "daily", 8, "monday", now=DAY)
                with time_machine.travel(DAY + timedelta(hours=7)):
                    digests.add_item(email, "news")
        worker = world.start_worker()
        scheduler = start_scheduler(world, tmp_path / "scheduler.log")
        assert wait_until(lambda: registrations(world) == [DISPATCH_ID], timeout=30)
        deferred = world.send(1, "deferred", delay=3)  # moved by the worker's scheduler child

        accepted: list[str] = []
        refused: list[str] = []
        old = world.cluster.master
        promoted_at = killed_at = promoted_wall = 0.0
        deadline = time.monotonic() + 60
        n = 0
        while len(accepted) < BURST and time.monotonic() < deadline:
            if len(accepted) == KILL_AT and not killed_at:
                old.stop(kill=True)
                killed_at = time.monotonic()
            mail_id = world.try_send(f"burst{n}@example.com")
            n += 1
            (accepted if mail_id else refused).append(mail_id or f"refused{n}")
            master = world.cluster.current_master()
            if killed_at and not promoted_at and master not in (None, old):
                promoted_at, promoted_wall = time.monotonic(), time.time()
                # Back as the new master's replica, as a supervisor restarts it (Sentinel
                # itself converts a returning old master only after 8 s: docs/sentinel.md).
                assert master is not None
                old.extra_args = ["--replicaof", "127.0.0.1", str(master.port)]
                old.start()
            if mail_id is None:
                time.sleep(0.05)  # the next try is a new mail; a refused one may exist
        assert len(accepted) == BURST, f"only {len(accepted)} accepted in 60 s"
        assert promoted_at, "no failover seen"
        new = world.cluster.wait_promoted(old)

        everything = accepted + deferred
        world.wait_delivered(everything, timeout=60)
        first_after = min(t - promoted_wall for t in delivered_at(world) if t >= promoted_wall)
        assert first_after < RESUME_LIMIT

        # The digest dispatcher after the failover: each period once, though fired twice.
        fire(world, DAY + timedelta(hours=8, minutes=2))
        assert wait_until(
            lambda: all(
                any(email in m.rcpt_tos for m in world.smtp.messages)
                for email in DIGEST_SUBSCRIBERS
            ),
            timeout=30,
        )
        fire(world, DAY + timedelta(hours=8, minutes=3))
        world.settle_quietly(2)
        by_rcpt = Counter(r for m in world.smtp.messages for r in m.rcpt_tos)
        assert all(by_rcpt[email] == 1 for email in DIGEST_SUBSCRIBERS), by_rcpt

        # Web: accepts again; worker and scheduler lived through it.
        response = world.app.test_client().post(
            "/api/mail",
            json={"to": "web@example.com", "subject": "After", "template": "test"},
            headers={"Authorization": "Bearer fault-suite-token"},
        )
        assert response.status_code == 202
        assert worker.alive(), worker.tail()
        assert scheduler.poll() is None, (tmp_path / "scheduler.log").read_text()

        counts = Counter(m.message_id for m in world.smtp.messages)
        wanted = {world.message_id(i) for i in everything}
        lost = sum(1 for m in wanted if counts[m] == 0)
        duplicated = sum(n - 1 for m, n in counts.items() if m in wanted and n > 1)
        assert lost == 0
        assert all(n <= 2 for n in counts.values()), "a mail went out three times"
        assert duplicated <= 1, "only the mail in flight at the kill may go out twice"
        assert all(world.status_of(i) == status.SENT for i in everything)
        assert world.cluster.replicas_of(new) == 1
        report.add(
            Row(
                "Sentinel failover: master SIGKILLed",
                f"{BURST} mails sent one by one + 1 deferred + 3 digests, 1 worker",
                f"master killed after {KILL_AT} accepted; promotion "
                f"{promoted_at - killed_at:.1f} s later; old master restarted as replica",
                lost,
                duplicated,
                f"first delivery {first_after:.1f} s after promotion",
                f"{len(refused)} send_email calls refused (503) during the failover; "
                "digests once each; worker, scheduler, web kept running",
            )
        )
    finally:
        if scheduler is not None:
            os.killpg(scheduler.pid, signal.SIGKILL)
            scheduler.wait(timeout=10)
        world.stop()


def test_replica_stopped_refuses_mail_until_it_is_back(tmp_path: Path, report: Report) -> None:
    world = SentinelDeployment(tmp_path, {})
    try:
        worker = world.start_worker()
        before = world.send(5, "before")
        world.wait_delivered(before, timeout=30)
        world.cluster.replica.stop()
        assert wait_until(lambda: world.cluster.replicas_of(world.cluster.master) == 0)
        started = time.monotonic()
        assert world.try_send("refused@example.com") is None
        refused_in = time.monotonic() - started
        response = world.app.test_client().post(
            "/api/mail",
            json={"to": "ann@example.com", "subject": "Hello", "template": "test"},
            headers={"Authorization": "Bearer fault-suite-token"},
        )
        assert response.status_code == 503
        world.cluster.replica.start()  # same port and directory: it resyncs
        back = time.monotonic()
        assert wait_until(lambda: world.cluster.in_sync(world.cluster.replica), timeout=30)
        after: list[str] = []

        def accepted() -> bool:
            mail_id = world.try_send("after@example.com")
            after.extend([mail_id] if mail_id else [])
            return bool(after)

        assert wait_until(accepted, timeout=15)
        accepted_again = time.monotonic() - back
        world.wait_delivered(before + after, timeout=30)
        world.settle_quietly(1)
        # A refused mail may still go out (it reached the master, not the replica):
        # the caller was told to retry. Accepted ones go out exactly once.
        counts = Counter(m.message_id for m in world.smtp.messages)
        lost = sum(1 for i in before + after if counts[world.message_id(i)] == 0)
        duplicated = sum(n - 1 for n in counts.values())
        assert lost == 0 and duplicated == 0
        assert worker.alive(), worker.tail()
        report.add(
            Row(
                "Sentinel: the only replica stopped",
                "5 mails before, then send_email and POST /api/mail while it is down",
                "replica stopped, restarted after the refusals",
                lost,
                duplicated,
                f"accepted again {accepted_again:.1f} s after the replica restarted",
                f"send_email refused (QueueUnavailableError) in {refused_in * 1000:.0f} ms, "
                "API 503; nothing accepted that a failover could lose",
            )
        )
    finally:
        world.stop()
