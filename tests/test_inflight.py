"""Mails in flight at once in one worker (app/inflight.py), against a real SMTP server."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from app import inflight, status
from app.inflight import effective_concurrency
from app.mail import send_email
from app.worker import AppWorker
from tests.helpers import counting_redis_writes
from tests.servers import SMTPServer

PROBE = inflight.PROBE_MAILS  # a worker's first mails run inline, timing the server


def queue(redis: Redis, name: str = "mail") -> Queue:
    return Queue(name, connection=redis, serializer=JSONSerializer)


@pytest.fixture
def concurrency(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], None]]:
    def set_to(value: int) -> None:
        monkeypatch.setenv("MAIL_CONCURRENCY", str(value))

    yield set_to


class Overlap:
    """Counts SMTP transactions open at once at the server (MAIL FROM to end of DATA)."""

    def __init__(self, smtp: SMTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = 0
        self.most = 0
        self.lock = threading.Lock()
        handler = smtp.handler
        mail, data = handler.handle_MAIL, handler.handle_DATA

        async def counted_mail(*args: Any) -> str:
            with self.lock:
                self.open += 1
                self.most = max(self.most, self.open)
            reply: str = await mail(*args)
            return reply

        async def counted_data(*args: Any) -> str:
            try:
                reply: str = await data(*args)
                return reply
            finally:
                with self.lock:
                    self.open -= 1

        # The server outlives the test: its handler is patched for this test only.
        monkeypatch.setattr(handler, "handle_MAIL", counted_mail)
        monkeypatch.setattr(handler, "handle_DATA", counted_data)


def test_mails_go_out_several_at_once_each_on_a_connection_of_its_own(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    concurrency: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    concurrency(4)
    smtp_server.handler.reply_delay = 0.05  # a server a round trip away
    overlap = Overlap(smtp_server, monkeypatch)
    ids = [send_email(f"user{i}@example.com", f"Hello {i}", "test").id for i in range(20)]
    work()

    received = smtp_server.wait_for(20)
    assert sorted(r.message_id for r in received) == sorted(f"<{i}@example.com>" for i in ids)
    assert all(status.load(redis_client, i).status == status.SENT for i in ids)  # type: ignore[union-attr]
    assert overlap.most == 4, "the worker should keep MAIL_CONCURRENCY mails in flight"
    # Reused connections, never more than MAIL_CONCURRENCY of them.
    assert len(smtp_server.handler.connections) == 4
    q = queue(redis_client)
    assert (q.count, q.started_job_registry.count, q.failed_job_registry.count) == (0, 0, 0)
    assert redis_client.llen(q.intermediate_queue_key) == 0


def test_a_mail_in_flight_costs_about_one_redis_round_trip(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    concurrency: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its start (with the previous mails' `sent` and its attempt claim), shared with
    the other mails a freed slot takes at the same moment; claims come in dozens."""
    concurrency(8)
    smtp_server.handler.reply_delay = 0.01
    count = 96
    for i in range(count):
        send_email(f"user{i}@example.com", "Hi", "test")
    with counting_redis_writes(monkeypatch) as sends:
        work()
    assert len(smtp_server.wait_for(count)) == count
    # A second round trip a mail would add 96; the worker's start, maintenance and
    # stop, the probe's batch, claims and empty-queue checks stay well under that.
    assert len(sends) <= count + 80


def test_a_claimed_id_whose_job_is_gone_is_dropped(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    concurrency: Callable[[int], None],
) -> None:
    concurrency(4)
    smtp_server.handler.reply_delay = 0.01  # slots: the claims are app/inflight.py's
    # More than the probe's batch claims (leanworker.BATCH_SIZE), so the dangling id
    # at the end is claimed in slot mode.
    ids = [send_email(f"user{i}@example.com", "Hi", "test").id for i in range(30)]
    q = queue(redis_client)
    redis_client.rpush(q.key, "no-such-job")  # e.g. its hash expired or was deleted
    work()

    assert len(smtp_server.wait_for(len(ids))) == len(ids)
    assert (q.count, redis_client.llen(q.intermediate_queue_key)) == (0, 0)


def test_the_started_registry_names_every_mail_in_flight(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    concurrency: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    concurrency(3)
    smtp_server.handler.hang_seconds = 0.5  # every DATA waits: all three are in flight
    seen: list[tuple[int, set[str]]] = []
    data = smtp_server.handler.handle_DATA
    registry = queue(redis_client).started_job_registry

    async def look(*args: Any) -> str:
        # At the server, mid-DATA, for each mail: what RQ says the worker runs.
        members = [m.decode() for m in redis_client.zrange(registry.key, 0, -1)]
        names = [redis_client.hget(f"rq:execution:{m}", "worker_name") for m in members]
        # (An execution may end between the two reads: its hash is gone by the second.)
        seen.append((len(members), {name.decode() for name in names if name is not None}))
        reply: str = await data(*args)
        return reply

    monkeypatch.setattr(smtp_server.handler, "handle_DATA", look)
    for i in range(6):
        send_email(f"user{i}@example.com", f"Hello {i}", "test")
    worker = work()

    assert len(smtp_server.wait_for(6)) == 6
    assert max(count for count, _ in seen) == 3
    assert all(names == {worker.name} for _, names in seen)
    assert registry.count == 0


def test_a_stuck_mail_times_out_while_the_others_finish(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    concurrency: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its job's deadline fires (MAIL_JOB_TIMEOUT 5 s; the socket timeout, 30 s, would be
    far later): the stuck mail is retried, the others are sent meanwhile."""
    concurrency(4)
    app_ctx.config["MAIL_JOB_TIMEOUT"] = 5  # what send_email gives the job
    monkeypatch.setenv("MAIL_TIMEOUT", "30")  # the worker's socket timeout
    data = smtp_server.handler.handle_DATA
    release = threading.Event()

    async def hang_for_stuck(server: Any, session: Any, envelope: Any) -> str:
        if "stuck@example.com" in envelope.rcpt_tos:
            import asyncio

            while not release.is_set():
                await asyncio.sleep(0.05)
            return "451 4.3.0 too late"
        reply: str = await data(server, session, envelope)
        return reply

    monkeypatch.setattr(smtp_server.handler, "handle_DATA", hang_for_stuck)
    # A server a round trip away: after its probe (mails inline) the worker uses slots.
    smtp_server.handler.reply_delay = 0.02
    others = [send_email(f"probe{i}@example.com", "First", "test").id for i in range(PROBE)]
    stuck = send_email("stuck@example.com", "Stuck", "test").id
    others += [send_email(f"user{i}@example.com", f"Hello {i}", "test").id for i in range(11)]
    try:
        work()
    finally:
        release.set()

    assert len(smtp_server.wait_for(len(others))) == len(others)
    assert all(status.load(redis_client, i).status == status.SENT for i in others)  # type: ignore[union-attr]
    record = status.load(redis_client, stuck)
    assert record is not None and record.status == status.RETRYING
    assert "timeout" in record.last_error
    q = queue(redis_client)
    assert q.started_job_registry.count == 0
    # RQ's retry path took it: it waits in the scheduled registry for its next attempt.
    assert q.scheduled_job_registry.get_job_ids() == [stuck]


def test_a_warm_shutdown_finishes_every_mail_in_flight_and_starts_no_more(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    env: dict[str, str],
    concurrency: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    concurrency(4)
    smtp_server.handler.hang_seconds = 0.3
    ids = [send_email(f"user{i}@example.com", f"Hello {i}", "test").id for i in range(20)]
    worker = AppWorker(["mail", "digests"])
    data = smtp_server.handler.handle_DATA

    datas = 0

    async def stop_in_slots(*args: Any) -> str:
        # The first mails are the worker's inline probe (a slow server: it switches to
        # slots); at the next, four are in flight.
        nonlocal datas
        datas += 1
        if datas == PROBE + 1:
            worker._stop_requested = True  # what RQ's SIGTERM handler sets on a busy worker
        reply: str = await data(*args)
        return reply

    monkeypatch.setattr(smtp_server.handler, "handle_DATA", stop_in_slots)
    worker.work(burst=True, logging_level="WARNING")

    sent = [i for i in ids if status.load(redis_client, i).status == status.SENT]  # type: ignore[union-attr]
    assert len(sent) == PROBE + 4, "the probe's and the four in flight finish; no more start"
    assert len(smtp_server.messages) == PROBE + 4
    q = queue(redis_client)
    assert q.count == 20 - PROBE - 4
    assert q.started_job_registry.count == 0
    assert redis_client.llen(q.intermediate_queue_key) == 0


def test_digest_chunks_run_in_flight_beside_mail(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    concurrency: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A digest chunk is a job like a mail: it takes a slot, and RQ ends it as its own."""
    from app import digests

    concurrency(4)
    monkeypatch.setenv("DIGEST_CHUNK_SIZE", "2")
    app_ctx.config["DIGEST_CHUNK_SIZE"] = 2
    smtp_server.handler.reply_delay = 0.02
    overlap = Overlap(smtp_server, monkeypatch)
    for i in range(8):
        email = f"sub{i}@example.com"
        digests.upsert_subscriber(email, "UTC", "daily", hour=0)
        digests.add_item(email, f"Item for {i}", "https://x.example/1")
    result = digests.dispatch_due()
    assert (result.enqueued, result.jobs) == (8, 4)
    work()

    received = smtp_server.wait_for(8)
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(
        f"sub{i}@example.com" for i in range(8)
    )
    assert overlap.most >= 2, "the chunks should be delivered side by side"
    q = queue(redis_client, "digests")
    assert (q.count, q.started_job_registry.count, q.failed_job_registry.count) == (0, 0, 0)


def test_with_a_fast_server_mail_runs_inline_one_at_a_time(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    work: Callable[[], AppWorker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loopback: a slot thread per mail would cost more CPU than the wait it hides. (This
    test's server shares the test's process and GIL, so its replies take a millisecond
    or two: the threshold is raised to stand for a server that fast.)"""
    monkeypatch.setattr(inflight, "INLINE_WAIT", 0.05)
    overlap = Overlap(smtp_server, monkeypatch)
    ids = [send_email(f"user{i}@example.com", f"Hello {i}", "test").id for i in range(40)]
    work()

    assert len(smtp_server.wait_for(40)) == 40
    assert all(status.load(redis_client, i).status == status.SENT for i in ids)  # type: ignore[union-attr]
    assert overlap.most == 1
    assert len(smtp_server.handler.connections) == 1


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"MAIL_CONCURRENCY": 16, "MAIL_MAX_PER_SECOND": None, "MAIL_JOB_TIMEOUT": 90}, 16),
        ({"MAIL_CONCURRENCY": 16, "MAIL_MAX_PER_SECOND": 14.0, "MAIL_JOB_TIMEOUT": 90}, 16),
        # 0.1 mails/s: in 45 s (half the timeout) four permits; more would time out waiting.
        ({"MAIL_CONCURRENCY": 16, "MAIL_MAX_PER_SECOND": 0.1, "MAIL_JOB_TIMEOUT": 90}, 4),
        ({"MAIL_CONCURRENCY": 16, "MAIL_MAX_PER_SECOND": 0.05, "MAIL_JOB_TIMEOUT": 30}, 1),
        ({"MAIL_CONCURRENCY": 1, "MAIL_MAX_PER_SECOND": None, "MAIL_JOB_TIMEOUT": 90}, 1),
    ],
)
def test_a_tight_rate_limit_lowers_the_mails_in_flight(
    settings: dict[str, Any], expected: int
) -> None:
    assert effective_concurrency(settings) == expected


def test_slot_threads_share_two_malloc_arenas_unless_the_user_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A narrow unit test: the mallopt call itself has no observable getter."""
    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, parameter: int, value: int) -> int:
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(inflight.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    inflight._share_malloc_arenas()
    assert calls == [(-8, 2)]  # M_ARENA_MAX in glibc's malloc.h
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    inflight._share_malloc_arenas()
    assert calls == [(-8, 2)]
