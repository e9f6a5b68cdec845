"""Redis restarted mid-burst with AOF: nothing lost, everything reconnects, and while
it is down the web side fails fast instead of hanging or claiming success."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app import status
from app.errors import QueueUnavailableError
from app.mail import send_email
from tests.faults.harness import Report, Row, deployment
from tests.servers import wait_until

pytestmark = pytest.mark.fault

FAST_FAIL_LIMIT = 1.0  # seconds; "well under a few seconds"


def test_redis_restarted_mid_burst_with_aof(tmp_path: Path, report: Report, mode: str) -> None:
    with deployment(tmp_path, mode, MAIL_RETRY_INTERVALS="2,2,2,2,2,2,2,2,2,2") as world:
        world.smtp.handler.hang_seconds = 0.1
        waiting = [f"retry{i}@example.com" for i in range(3)]
        world.smtp.handler.refuse_rcpt = dict.fromkeys(waiting, "451 4.2.0 mailbox busy")
        worker = world.start_worker()
        retry_ids = world.send(3, "retry")
        scheduled_ids = world.send(3, "later", delay=4)
        queued_ids = world.send(20)
        assert wait_until(
            lambda: (
                all(world.status_of(i) == status.RETRYING for i in retry_ids)
                and len(world.smtp.messages) >= 3
            ),
            timeout=20,
        )
        assert all(world.status_of(i) == status.SCHEDULED for i in scheduled_ids)

        world.redis_server.stop(kill=True)
        down = time.monotonic()
        # The web side while Redis is down: fast, clear, never a false success.
        with world.app.app_context():
            started = time.monotonic()
            with pytest.raises(QueueUnavailableError):
                send_email("ann@example.com", "Hello", "test")
            send_fail = time.monotonic() - started
        client = world.app.test_client()
        started = time.monotonic()
        response = client.post(
            "/api/mail",
            json={"to": "ann@example.com", "subject": "Hello", "template": "test"},
            headers={"Authorization": "Bearer fault-suite-token"},
        )
        api_fail = time.monotonic() - started
        assert response.status_code == 503
        assert "nothing was queued" in response.get_json()["error"]
        health = client.get("/healthz")
        assert health.status_code == 503
        assert send_fail < FAST_FAIL_LIMIT and api_fail < FAST_FAIL_LIMIT
        time.sleep(1)  # a short outage, while the worker keeps trying
        world.redis_server.start()  # same port and directory: the AOF is replayed
        back = time.monotonic()
        world.smtp.handler.refuse_rcpt = {}

        after_ids = world.send(2, "after")  # the web side reconnected by itself
        everything = retry_ids + scheduled_ids + queued_ids + after_ids
        world.wait_delivered(everything, timeout=60)
        recovered = time.monotonic() - back
        world.settle_quietly(1)
        # At most one more copy of each mail in flight when Redis died (accepted, maybe,
        # but its `sent` not written), so at most MAIL_CONCURRENCY in all.
        lost, duplicated = world.tally(everything, may_repeat=set(everything))
        assert lost == 0
        assert duplicated <= world.app.config["MAIL_CONCURRENCY"]
        assert worker.alive(), "the worker must survive a Redis restart"
        assert all(world.status_of(i) == status.SENT for i in everything)
        report.add(
            Row(
                f"Redis restarted (AOF) ({mode})",
                "20 queued + 3 scheduled + 3 retry-waiting, 1 worker",
                f"redis-server SIGKILLed mid-burst, down {back - down:.1f} s, restarted",
                lost,
                duplicated,
                f"{recovered:.1f} s after Redis was back",
                f"worker and web reconnected; send_email failed in {send_fail * 1000:.0f} ms, "
                f"API 503 in {api_fail * 1000:.0f} ms",
            )
        )
