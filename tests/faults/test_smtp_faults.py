"""SMTP server stopped, answering 451, answering 550, hanging: real worker processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app import status
from tests.faults.harness import Report, Row, deployment
from tests.servers import wait_until

pytestmark = pytest.mark.fault


def test_smtp_server_stopped_mid_burst(tmp_path: Path, report: Report) -> None:
    with deployment(tmp_path) as world:
        world.start_worker()
        first = world.send(10, "early")
        world.wait_delivered(first, timeout=20)
        world.smtp_down()
        later = world.send(10, "late")
        assert wait_until(
            lambda: all(world.status_of(i) == status.RETRYING for i in later), timeout=20
        ), "mail did not move to retrying while the server was down"
        time.sleep(2)  # an outage of a few retry intervals
        world.smtp_up()
        recovered = world.wait_delivered(first + later, timeout=30)
        world.settle_quietly(1)
        lost, duplicated = world.tally(first + later)
        assert (lost, duplicated) == (0, 0)
        assert all(world.status_of(i) == status.SENT for i in first + later)
        report.add(
            Row(
                "SMTP server stopped",
                "20 mails, 1 worker",
                "server stopped ~2 s mid-burst (connection refused)",
                lost,
                duplicated,
                f"{recovered:.1f} s after restart",
                "retried with backoff, each sent once",
            )
        )


def test_smtp_server_answers_451(tmp_path: Path, report: Report, mode: str) -> None:
    with deployment(tmp_path, mode) as world:
        world.smtp.handler.reply = "451 4.3.0 mail server temporarily rejected message"
        world.start_worker()
        ids = world.send(20)
        assert wait_until(
            lambda: all(world.status_of(i) == status.RETRYING for i in ids), timeout=20
        )
        world.smtp.handler.reply = None
        recovered = world.wait_delivered(ids, timeout=30)
        world.settle_quietly(1)
        lost, duplicated = world.tally(ids)
        assert (lost, duplicated) == (0, 0)
        records = [status.load(world.redis, i) for i in ids]
        assert all(r is not None and r.status == status.SENT and r.attempts >= 2 for r in records)
        report.add(
            Row(
                f"SMTP answers 451 ({mode})",
                "20 mails, 1 worker",
                "every DATA answered 451 until all were retrying",
                lost,
                duplicated,
                f"{recovered:.1f} s after the server recovered",
                "each mail sent once, on attempt 2+",
            )
        )


def test_smtp_server_answers_550(tmp_path: Path, report: Report) -> None:
    with deployment(tmp_path) as world:
        world.smtp.handler.reply = "550 5.7.1 message rejected"
        world.start_worker()
        ids = world.send(10)
        assert wait_until(lambda: all(world.status_of(i) == status.FAILED for i in ids), timeout=20)
        world.smtp.handler.reply = None
        time.sleep(3)  # longer than every retry interval: nothing may be retried
        records = [status.load(world.redis, i) for i in ids]
        assert all(
            r is not None
            and r.attempts == 1
            and r.last_error == "SMTP server refused: 550 5.7.1 message rejected"
            for r in records
        )
        assert world.received() == {}
        report.add(
            Row(
                "SMTP answers 550",
                "10 mails, 1 worker",
                "every DATA answered 550",
                0,
                0,
                "n/a (permanent)",
                "10 failed at once with the reply kept, 0 retried, 0 received",
            )
        )


def test_smtp_server_hangs(tmp_path: Path, report: Report, mode: str) -> None:
    with deployment(tmp_path, mode) as world:
        world.smtp.handler.hang_seconds = 5  # longer than MAIL_TIMEOUT (1 s)
        world.start_worker()
        ids = world.send(10)
        assert wait_until(
            lambda: sum(world.status_of(i) == status.RETRYING for i in ids) >= 3, timeout=20
        )
        world.smtp.handler.hang_seconds = 0
        recovered = world.wait_delivered(ids, timeout=40)
        world.settle_quietly(1)
        lost, duplicated = world.tally(ids)
        assert (lost, duplicated) == (0, 0)
        report.add(
            Row(
                f"SMTP server hangs ({mode})",
                "10 mails, 1 worker",
                "DATA unanswered for 5 s (MAIL_TIMEOUT 1 s) until 3 mails were retrying",
                lost,
                duplicated,
                f"{recovered:.1f} s after the server answered again",
                "timed-out attempts were never accepted",
            )
        )
