"""Priority lanes: `priority` picks a mail's queue, and workers serve the lanes in order."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask
from redis import Redis

from app import leanworker, status
from app.errors import InvalidMailError
from app.mail import send_email, send_many
from app.queues import MAIL_QUEUES, PRIORITIES, QUEUE_NAMES, get_queue
from app.worker import AppWorker
from tests.conftest import run_worker
from tests.helpers import scheduler_pass
from tests.servers import SMTPServer
from tests.test_retry import later


def lane_counts(redis_client: Redis) -> dict[str, int]:
    return {name: int(redis_client.llen(f"rq:queue:{name}")) for name in MAIL_QUEUES}


def arrival(smtp_server: SMTPServer) -> list[str]:
    """The mail ids the server received, in order."""
    return [r.message_id.strip("<>").split("@")[0] for r in smtp_server.messages]


# -- a mail's lane -------------------------------------------------------------------------


@pytest.mark.parametrize("priority", ["high", "normal", "bulk"])
def test_each_lane_is_its_own_queue_and_the_record_shows_it(
    app_ctx: Flask, client: Any, auth: dict[str, str], redis_client: Redis, priority: str
) -> None:
    job = send_email("ann@example.com", "Hi", "test", priority=priority)
    assert job.origin == PRIORITIES[priority]
    assert lane_counts(redis_client) == {q: int(q == PRIORITIES[priority]) for q in MAIL_QUEUES}
    assert client.get(f"/api/mail/{job.id}", headers=auth).get_json()["priority"] == priority

    reply = client.post(
        "/api/mail",
        headers=auth,
        json={"to": "bo@example.com", "subject": "Hi", "template": "test", "priority": priority},
    )
    assert reply.status_code == 202
    record = status.load(redis_client, reply.get_json()["id"])
    assert record is not None and record.priority == priority
    assert lane_counts(redis_client)[PRIORITIES[priority]] == 2


def test_the_default_lane_is_normal(app_ctx: Flask, redis_client: Redis) -> None:
    job = send_email("ann@example.com", "Hi", "test")
    assert job.origin == "mail"
    assert status.load(redis_client, job.id).priority == "normal"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["urgent", "", "HIGH", 1, None])
def test_a_bad_priority_is_refused_naming_it_and_nothing_is_written(
    app_ctx: Flask, client: Any, auth: dict[str, str], redis_client: Redis, bad: Any
) -> None:
    if bad is not None:  # None is the API's "not given"
        with pytest.raises(InvalidMailError) as caught:
            send_email("ann@example.com", "Hi", "test", priority=bad)
        assert caught.value.field == "priority" and isinstance(caught.value, ValueError)
        with pytest.raises(InvalidMailError) as caught:
            send_many([{"to": "a@example.com", "subject": "Hi", "template": "test"}], priority=bad)
        assert caught.value.field == "priority"
        with pytest.raises(InvalidMailError) as caught:
            ok = {"to": "a@example.com", "subject": "Hi", "template": "test"}
            send_many([ok, {**ok, "priority": bad}])
        assert caught.value.field == "messages[1].priority"
        mail = {"to": "bo@example.com", "subject": "Hi", "template": "test", "priority": bad}
        reply = client.post("/api/mail", headers=auth, json=mail)
        assert reply.status_code == 400
        assert "priority" in reply.get_json()["error"]
    assert redis_client.keys("mq:mail:*") == []
    assert lane_counts(redis_client) == dict.fromkeys(MAIL_QUEUES, 0)


def test_send_many_takes_a_call_default_and_each_mails_own_lane(
    app_ctx: Flask, redis_client: Redis
) -> None:
    base = {"subject": "Hi", "template": "test"}
    ids = send_many(
        [
            {**base, "to": "a@example.com"},
            {**base, "to": "b@example.com", "priority": "high"},
            {**base, "to": "c@example.com"},
            {**base, "to": "d@example.com", "priority": "normal"},
        ],
        priority="bulk",
    )
    lanes = [status.load(redis_client, i).priority for i in ids]  # type: ignore[union-attr]
    assert lanes == ["bulk", "high", "bulk", "normal"]
    queued = {
        q: [i.decode() for i in redis_client.lrange(f"rq:queue:{q}", 0, -1)] for q in MAIL_QUEUES
    }
    assert queued == {"mail-high": [ids[1]], "mail": [ids[3]], "mail-bulk": [ids[0], ids[2]]}


def test_deferred_mail_comes_back_to_its_lane(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    job = send_email("ann@example.com", "Hi", "test", delay=30, priority="bulk")
    bulk = get_queue("mail-bulk")
    assert job.id in bulk.scheduled_job_registry
    assert get_queue("mail").scheduled_job_registry.count == 0
    with later(40):
        run_worker(with_scheduler=True)
    smtp_server.wait_for(1)
    assert arrival(smtp_server) == [job.id]


def test_a_retry_comes_back_to_its_lane(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    smtp_server.handler.replies = ["451 4.3.0 try again later"]
    job = send_email("ann@example.com", "Hi", "test", priority="high")
    run_worker()
    high = get_queue("mail-high")
    assert job.id in high.scheduled_job_registry
    assert status.load(redis_client, job.id).status == status.RETRYING  # type: ignore[union-attr]
    with later(60):
        scheduler_pass(redis_client)
        assert lane_counts(redis_client) == {"mail-high": 1, "mail": 0, "mail-bulk": 0}
        run_worker()
    smtp_server.wait_for(1)
    assert arrival(smtp_server) == [job.id]


def test_flask_mail_retry_requeues_into_the_mails_own_lane(
    app: Flask, smtp_server: SMTPServer, redis_client: Redis
) -> None:
    smtp_server.handler.replies = ["550 5.1.1 no such user"]
    with app.app_context():
        job = send_email("ann@example.com", "Hi", "test", priority="bulk")
    run_worker()
    assert job.id in get_queue("mail-bulk", app).failed_job_registry
    listed = app.test_cli_runner().invoke(args=["mail", "failed"])
    assert f"{job.id}" in listed.output and "priority=bulk" in listed.output
    assert listed.output.splitlines()[-1] == "1 failed mail (high 0, normal 0, bulk 1)"

    result = app.test_cli_runner().invoke(args=["mail", "retry", job.id])
    assert result.exit_code == 0, result.output
    assert lane_counts(redis_client) == {"mail-high": 0, "mail": 0, "mail-bulk": 1}
    assert job.id not in get_queue("mail-bulk", app).failed_job_registry
    run_worker()
    smtp_server.wait_for(1)
    assert arrival(smtp_server) == [job.id]


# -- order of service ------------------------------------------------------------------------


def test_workers_serve_the_lanes_strictly_in_order(
    app_ctx: Flask, smtp_server: SMTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAIL_CONCURRENCY", "1")
    sent: dict[str, list[str]] = {}
    for priority in ("bulk", "normal", "high"):  # queued lowest first
        sent[priority] = [
            send_email(f"{priority}{i}@example.com", "Hi", "test", priority=priority).id
            for i in range(3)
        ]
    run_worker()
    smtp_server.wait_for(9)
    assert arrival(smtp_server) == sent["high"] + sent["normal"] + sent["bulk"]


@pytest.mark.parametrize(
    ("concurrency", "reply_delay", "bound"),
    [(1, 0.0, 2), (16, 0.0, 2), (16, 0.02, 16 + 16)],  # (.., .., mails before it at most)
    ids=["one-at-a-time", "16-inline-fast-server", "16-in-slots-20ms"],
)
def test_a_high_mail_overtakes_a_batch_of_bulk_mail_already_claimed(
    app_ctx: Flask,
    smtp_server: SMTPServer,
    redis_client: Redis,
    monkeypatch: pytest.MonkeyPatch,
    concurrency: int,
    reply_delay: float,
    bound: int,
) -> None:
    """A worker claims up to BATCH_SIZE bulk mails at once; a high mail that arrives
    while it delivers the first still goes out next but one (the lane check rides on
    the next mail's start), and the claimed bulk mails go back to their queue. With
    mails in slots (a server 20 ms away), the slots already busy and those started in
    the round trip that saw the high mail may finish first: `bound`, not the backlog."""
    monkeypatch.setenv("MAIL_CONCURRENCY", str(concurrency))  # inline on a fast server
    smtp_server.handler.reply_delay = reply_delay
    app = app_ctx
    base = {"subject": "Hi", "template": "test"}
    bulk = send_many(
        [{**base, "to": f"b{i}@example.com"} for i in range(3 * leanworker.BATCH_SIZE)],
        priority="bulk",
    )
    urgent: list[str] = []
    data = smtp_server.handler.handle_DATA
    lock = threading.Lock()
    # In slots, the high mail comes once they are all busy (past the inline probe).
    trigger = 1 if reply_delay == 0 else 2 * concurrency
    seen: list[int] = []

    async def enqueue_high_during_the_first(*args: Any) -> str:
        with lock:
            seen.append(1)
            if not urgent and len(seen) == trigger:
                with app.app_context():
                    urgent.append(
                        send_email("reset@example.com", "Reset", "test", priority="high").id
                    )
        reply: str = await data(*args)
        return reply

    monkeypatch.setattr(smtp_server.handler, "handle_DATA", enqueue_high_during_the_first)
    run_worker()
    received = smtp_server.wait_for(len(bulk) + 1)
    order = arrival(smtp_server)
    assert sorted(order) == sorted([*bulk, *urgent]), "each mail once, none lost"
    # Enqueued during the trigger-th mail's DATA: inline, after at most that one and the
    # next; in slots, those in flight and those started with the round trip that saw it.
    assert order.index(urgent[0]) - (trigger - 1) <= bound, order.index(urgent[0])
    assert len(received) == len(bulk) + 1
    for name in MAIL_QUEUES:
        assert redis_client.llen(f"rq:queue:{name}:intermediate") == 0


def test_a_worker_listening_in_the_procfile_order_names_every_lane(env: dict[str, str]) -> None:
    worker = AppWorker(list(QUEUE_NAMES))
    assert [q.name for q in worker.queues] == ["mail-high", "mail", "digests", "mail-bulk"]


def test_healthz_and_metrics_show_every_lane(
    app_ctx: Flask, client: Any, auth: dict[str, str]
) -> None:
    send_email("ann@example.com", "Hi", "test", priority="bulk")
    health = client.get("/healthz").get_json()
    assert set(health["queues"]) == set(QUEUE_NAMES)
    assert health["queues"]["mail-bulk"]["queued"] == 1
    body = client.get("/metrics", headers=auth).get_data(as_text=True)
    assert 'mailqueue_queue_depth{queue="mail-bulk"} 1' in body
    assert 'mailqueue_queue_depth{queue="mail-high"} 0' in body


def test_an_idle_worker_wakes_for_work_on_any_lane_and_keeps_a_copy(
    app_ctx: Flask, redis_client: Redis
) -> None:
    """The idle pop blocks on the doorbell every enqueue rings, not on one queue: a bulk
    mail queued while it waits is claimed, into its lane's intermediate list."""
    from rq.job import Job

    from app.worker import AppQueue

    lanes = [AppQueue(name, connection=redis_client) for name in QUEUE_NAMES]
    app = app_ctx
    queued: list[str] = []

    def later() -> None:
        with app.app_context():
            queued.append(send_email("ann@example.com", "Hi", "test", priority="bulk").id)

    timer = threading.Timer(0.3, later)
    timer.start()
    try:
        got = AppQueue.dequeue_any(lanes, 5, redis_client, job_class=Job)
    finally:
        timer.join()
    assert got is not None
    job, queue = got
    assert (job.id, queue.name) == (queued[0], "mail-bulk")
    assert redis_client.lrange("rq:queue:mail-bulk:intermediate", 0, -1) == [job.id.encode()]
    assert redis_client.llen("mq:doorbell") == 0
