"""`flask mail failed | retry | purge`: operator tools, against real Redis and SMTP."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from flask import Flask
from redis import Redis
from rq.job import Job

from app import digests, status
from app.mail import send_email
from app.progress import Progress
from app.queues import MAIL_QUEUE, get_queue
from tests.servers import SMTPServer


def cli(app: Flask, *args: str) -> tuple[int, str]:
    result = app.test_cli_runner().invoke(args=["mail", *args])
    return result.exit_code, result.output


def failed_mail(
    app: Flask, smtp_server: SMTPServer, work: Callable[[], object], n: int
) -> list[str]:
    smtp_server.handler.reply = "550 5.1.1 mailbox unavailable"
    ids = [send_email(f"user{i}@example.com", "Hello", "test").id for i in range(n)]
    work()
    smtp_server.handler.reply = None
    return ids


def test_failed_lists_each_mail_with_its_reason(
    app_ctx: Flask, smtp_server: SMTPServer, work: Callable[[], object], redis_client: Redis
) -> None:
    ids = failed_mail(app_ctx, smtp_server, work, 2)
    send_email("ok@example.com", "Hello", "test")
    work()
    code, output = cli(app_ctx, "failed")
    assert code == 0
    lines = output.splitlines()
    assert lines[-1] == "2 failed mail (high 0, normal 2, bulk 0)"
    for mail_id in ids:
        [line] = [line for line in lines if line.startswith(mail_id)]
        assert "550 5.1.1 mailbox unavailable" in line and "attempts=1" in line


def test_failed_drops_index_entries_of_expired_records(
    app_ctx: Flask, smtp_server: SMTPServer, work: Callable[[], object], redis_client: Redis
) -> None:
    [mail_id] = failed_mail(app_ctx, smtp_server, work, 1)
    redis_client.delete(status.key(mail_id))  # as its TTL would
    code, output = cli(app_ctx, "failed")
    assert (code, output.splitlines()[-1]) == (0, "0 failed mail (high 0, normal 0, bulk 0)")
    assert redis_client.zcard(status.FAILED_INDEX) == 0


def test_retry_requeues_with_the_same_id_and_message_id(
    app_ctx: Flask, smtp_server: SMTPServer, work: Callable[[], object], redis_client: Redis
) -> None:
    [mail_id] = failed_mail(app_ctx, smtp_server, work, 1)
    code, output = cli(app_ctx, "retry", mail_id)
    assert code == 0
    lines = output.splitlines()
    assert lines[0] == f"re-queued {mail_id} to user0@example.com"
    assert re.fullmatch(r"1 re-queued, 0 skipped in \d+\.\d s", lines[1]) and len(lines) == 2
    record = status.load(redis_client, mail_id)
    assert record is not None and record.status == status.QUEUED and record.last_error == ""
    assert redis_client.ttl(status.key(mail_id)) == -1  # live again: no retention clock
    assert redis_client.zscore(status.FAILED_INDEX, mail_id) is None
    queue = get_queue(MAIL_QUEUE)
    assert mail_id not in queue.failed_job_registry
    job = Job.fetch(mail_id, connection=redis_client, serializer=queue.serializer)
    assert job.retries_left == len(app_ctx.config["MAIL_RETRY_INTERVALS"])
    work()
    [received] = smtp_server.wait_for(1)
    assert received.message_id == f"<{mail_id}@example.com>"
    record = status.load(redis_client, mail_id)
    assert record is not None and record.status == status.SENT and record.attempts == 2


def test_retry_all_and_what_it_skips(
    app_ctx: Flask, smtp_server: SMTPServer, work: Callable[[], object], redis_client: Redis
) -> None:
    ids = failed_mail(app_ctx, smtp_server, work, 3)
    code, output = cli(app_ctx, "retry", "--all")
    assert code == 0 and re.fullmatch(r"3 re-queued, 0 skipped in [0-9.]+ s", output.strip())
    work()
    assert sorted(m.message_id for m in smtp_server.wait_for(3)) == sorted(
        f"<{i}@example.com>" for i in ids
    )
    code, output = cli(app_ctx, "retry", ids[0], "0" * 32)
    assert code == 1
    assert f"skipped {ids[0]}: mail {ids[0]} is sent, not failed" in output
    assert "no mail 00000000000000000000000000000000" in output
    assert output.splitlines()[-1].startswith("0 re-queued, 2 skipped in ")
    assert cli(app_ctx, "retry")[0] == 2  # usage error: an ID or --all


def test_retry_skips_a_failed_digest_whose_items_wait_for_the_next_one(
    app_ctx: Flask, smtp_server: SMTPServer, work: Callable[[], object], redis_client: Redis
) -> None:
    with time_machine.travel(datetime(2026, 11, 27, 9, tzinfo=UTC), tick=False):
        digests.upsert_subscriber("ann@example.com", "UTC", "daily", 8)
        digests.add_item("ann@example.com", "Hello")
        smtp_server.handler.reply = "550 5.1.1 mailbox unavailable"
        assert digests.dispatch_due().enqueued == 1
        work()
        smtp_server.handler.reply = None
    [digest_id] = status.failed_ids(redis_client)
    code, output = cli(app_ctx, "retry", "--all")
    assert code == 0
    assert f"skipped {digest_id}: mail {digest_id} is a digest: its items go out" in output
    assert output.splitlines()[-1].startswith("0 re-queued, 1 skipped in ")
    assert redis_client.llen(digests.items_key("ann@example.com")) == 1  # kept for the next
    assert get_queue(MAIL_QUEUE).count == 0


def test_purge_removes_only_finished_mail_older_than_the_cutoff(
    app_ctx: Flask, smtp_server: SMTPServer, work: Callable[[], object], redis_client: Redis
) -> None:
    [failed_id] = failed_mail(app_ctx, smtp_server, work, 1)
    sent_id = send_email("ok@example.com", "Hello", "test").id
    work()
    queued_id = send_email("later@example.com", "Hello", "test").id

    code, output = cli(app_ctx, "purge", "--older-than", "1")
    assert code == 0 and output.splitlines()[-1] == "0 purged of 3 mail records"

    with time_machine.travel(datetime.now(UTC) + timedelta(days=2)):
        code, output = cli(app_ctx, "purge", "--older-than", "1")
    assert code == 0
    assert output.splitlines()[-1] == "2 purged of 3 mail records"
    assert not redis_client.exists(status.key(failed_id), status.key(sent_id))
    assert redis_client.exists(status.key(queued_id))
    assert redis_client.zcard(status.FAILED_INDEX) == 0
    queue = get_queue(MAIL_QUEUE)
    assert failed_id not in queue.failed_job_registry
    assert not redis_client.exists(Job.key_for(failed_id))
    assert cli(app_ctx, "purge")[0] == 2  # --older-than is required


def test_retry_all_shows_progress_not_a_line_per_mail(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    work: Callable[[], object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failed_mail(app_ctx, smtp_server, work, 3)
    # A progress line per mail (not only every 2 s), to see them in a fast test.
    monkeypatch.setattr("app.cli.Progress", functools.partial(Progress, interval=0.0))
    code, output = cli(app_ctx, "retry", "--all")
    assert code == 0
    lines = output.splitlines()
    assert lines[:3] == [
        "re-queueing failed mail: 1/3 (33%)",
        "re-queueing failed mail: 2/3 (66%)",
        "re-queueing failed mail: 3/3 (100%)",
    ]
    assert re.fullmatch(r"3 re-queued, 0 skipped in \d+\.\d s", lines[3]) and len(lines) == 4
    assert "@example.com" not in output
