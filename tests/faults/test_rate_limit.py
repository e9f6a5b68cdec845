"""MAIL_MAX_PER_SECOND across two worker processes, judged by the SMTP server's clock."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.harness import Report, Row, deployment

pytestmark = pytest.mark.fault

LIMIT = 4
MAILS = 16
# The test server stamps a mail when its handler runs, in this (busy) test process: a
# late stamp can pull two permit windows together. A per-process limit, the failure
# this guards against, shows twice the limit in any such window.
STAMP_SLACK = 0.1


def busiest_second(stamps: list[float], window: float = 1.0) -> int:
    """The most messages received in any window [t, t + window)."""
    stamps = sorted(stamps)
    best, start = 0, 0
    for end, stamp in enumerate(stamps):
        while stamp - stamps[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_two_workers_share_one_limit(tmp_path: Path, report: Report, mode: str) -> None:
    with deployment(tmp_path, mode, MAIL_MAX_PER_SECOND=str(LIMIT)) as world:
        world.start_worker()
        world.start_worker()
        ids = world.send(MAILS)
        started = time.monotonic()
        world.wait_delivered(ids, timeout=30)
        took = time.monotonic() - started
        lost, duplicated = world.tally(ids)
        assert (lost, duplicated) == (0, 0)
        stamps = sorted(m.received_at for m in world.smtp.messages)
        peak = busiest_second(stamps, 1.0 - STAMP_SLACK)
        assert peak <= LIMIT, [round(t - stamps[0], 3) for t in stamps]
        assert took >= (MAILS / LIMIT) - 1.5  # the limit held the burst back
        # Both workers sent mail: the limit is shared, not per process. (RQ's per-job
        # "Job OK" lines are DEBUG now, app/leanworker.py: ask each worker's counter.)
        done = [
            int(world.redis.hget(world.worker_key(w) or b"-", "successful_job_count") or 0)
            for w in world.workers
        ]
        assert all(done), (done, [w.tail(10) for w in world.workers])
        report.add(
            Row(
                f"provider rate limit ({mode})",
                f"{MAILS} mails, 2 workers, MAIL_MAX_PER_SECOND={LIMIT}",
                "none (a limit, not a fault)",
                lost,
                duplicated,
                f"drained in {took:.1f} s",
                f"busiest {1 - STAMP_SLACK:.1f} s window at the server: {peak} mails",
            )
        )
