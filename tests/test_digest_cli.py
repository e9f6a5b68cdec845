"""`flask digest run [--at]` and `flask digest preview EMAIL`."""

from __future__ import annotations

import functools
import re

import pytest
import time_machine
from flask import Flask
from redis import Redis

from app import digests
from app.progress import Progress
from tests.digest_helpers import bulk_subscribers, queued_pairs, utc


def test_run_at_a_given_time_prints_the_counts(app: Flask) -> None:
    runner = app.test_cli_runner()
    with app.app_context(), time_machine.travel(utc("2026-11-27T05:00"), tick=False):
        digests.upsert_subscriber("ann@example.com", "Europe/Berlin", "daily", 8)
        digests.upsert_subscriber("bob@example.com", "Asia/Tokyo", "daily", 23)
        early = runner.invoke(args=["digest", "run"])
        assert early.exit_code == 0, early.output
        assert "due: 0, enqueued: 0, skipped: 0" in early.output
        at = runner.invoke(args=["digest", "run", "--at", "2026-11-27T09:00+02:00"])
        assert at.exit_code == 0, at.output
        assert "due: 1, enqueued: 1, skipped: 0 (1 digest jobs)" in at.output
        assert queued_pairs() == [("ann@example.com", "2026-11-27")]


def test_run_refuses_a_bad_or_naive_time(app: Flask) -> None:
    runner = app.test_cli_runner()
    naive = runner.invoke(args=["digest", "run", "--at", "2026-11-27T08:00"])
    assert naive.exit_code == 2 and "UTC offset" in naive.output
    garbage = runner.invoke(args=["digest", "run", "--at", "tomorrow"])
    assert garbage.exit_code == 2 and "ISO 8601" in garbage.output


def test_preview_prints_the_next_digest(app: Flask) -> None:
    runner = app.test_cli_runner()
    with app.app_context(), time_machine.travel(utc("2026-11-27T05:00"), tick=False):
        digests.upsert_subscriber("ann@example.com", "UTC", "weekly", 9, "friday")
        digests.add_item("ann@example.com", "Bob <replied>", kind="comment")
        text = runner.invoke(args=["digest", "preview", "ann@example.com"])
        html = runner.invoke(args=["digest", "preview", "--html", "ann@example.com"])
        missing = runner.invoke(args=["digest", "preview", "nobody@example.com"])
    assert text.exit_code == 0, text.output
    assert "Subject: Your weekly digest: 1 new item" in text.output
    assert "Period: 2026-W48 (due 2026-11-27T09:00:00+00:00), 1 pending items" in text.output
    assert "* Bob <replied>" in text.output
    assert "Bob &lt;replied&gt;" in html.output
    assert missing.exit_code == 1 and "no subscriber nobody@example.com" in missing.output


def test_run_shows_progress_per_batch_and_ends_with_a_summary(
    app: Flask, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A progress line for every batch (not only every 2 s), to see them in a fast test.
    monkeypatch.setattr("app.cli.Progress", functools.partial(Progress, interval=0.0))
    emails = [f"s{n}@example.com" for n in range(4500)]  # CLAIM_BATCH is 2000
    with app.app_context(), time_machine.travel(utc("2026-11-27T09:00"), tick=False):
        bulk_subscribers(redis_client, emails, ["UTC"], utc("2026-11-27T08:00").timestamp())
        result = app.test_cli_runner().invoke(args=["digest", "run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:3] == [
        "dispatching due digests: 2000/4500 (44%)",
        "dispatching due digests: 4000/4500 (88%)",
        "dispatching due digests: 4500/4500 (100%)",
    ]
    assert re.fullmatch(
        r"due: 4500, enqueued: 4500, skipped: 0 \(45 digest jobs\) in \d+\.\d s", lines[3]
    )
    assert len(lines) == 4
